"""`c10 query` and `c10 selftest` on a real built cache: its signed engine, preprocessing, index."""
from __future__ import annotations

import json

import numpy as np
import pytest

from c10.cli import main as c10_main
from c10.features.preprocess import open_tile
from c10.features.shards import read_shard
from c10.query.flight import FlightCache
from c10.store.tiles import TileId, center_latlon


@pytest.fixture
def built(built_cache):
    return built_cache


def cli(capsys, *args) -> tuple[int, str]:
    code = c10_main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_a_tile_queried_gets_its_shard_descriptor_and_finds_itself(built, pub):
    searcher, model = FlightCache.open(built, [pub]).searcher()
    shard = sorted((built / "shards/global/15").iterdir())[2]
    rows = read_shard(shard)
    paths = [built / f"tiles/15/{int(r['x'])}/{int(r['y'])}.jpg" for r in rows]
    np.testing.assert_allclose(searcher.embed([open_tile(p) for p in paths]), rows["desc"],
                               atol=1e-5)
    hits = searcher.query_file(paths[0], k=3)
    assert (hits[0].z, hits[0].x, hits[0].y) == tuple(int(rows[0][k]) for k in "zxy")
    assert hits[0].score > 0.9999 and [h.rank for h in hits] == [1, 2, 3]
    assert hits[0].score >= hits[1].score >= hits[2].score


def test_query_cli_prints_tiles_with_their_centres(built, capsys, pub):
    tile = sorted((built / "tiles/15").rglob("*.jpg"))[4]
    code, out = cli(capsys, "query", built, tile, "-k", "4", "--json", "--trusted-keys", pub)
    assert code == 0, out
    data = json.loads(out)
    assert data["model"] == "global" and len(data["hits"]) == 4
    best = data["hits"][0]
    assert best["path"] == tile.relative_to(built).as_posix()
    assert (best["lat"], best["lon"]) == pytest.approx(
        center_latlon(TileId(best["z"], best["x"], best["y"])))
    code, out = cli(capsys, "query", built, tile, "--trusted-keys", pub)
    assert code == 0 and "lat" in out and tile.relative_to(built).as_posix() in out


def test_selftest_finds_mildly_perturbed_tiles(built, capsys, pub):
    code, out = cli(capsys, "selftest", built, "-n", "30", "--seed", "3", "--json",
                    "--trusted-keys", pub)
    assert code == 0, out
    result = json.loads(out)
    assert result["n"] == 30 and result["strength"] == "mild"
    assert result["recall@1"] >= 0.9 and result["recall@5"] >= result["recall@1"]
    code, out = cli(capsys, "selftest", built, "-n", "5", "--strength", "strong",
                    "--trusted-keys", pub)
    assert code == 0 and "recall@1" in out and "recall@5" in out


def test_query_before_any_build_says_build_first(cache, capsys, pub):
    code, out = cli(capsys, "query", cache, sorted((cache / "tiles").rglob("*.jpg"))[0],
                    "--trusted-keys", pub)
    assert (code == 10 and "Manifest.json" in out and "is missing" in out
            and "doit build_cache" in out and "Traceback" not in out)


def test_unreadable_query_image_is_named(built, capsys, tmp_path, pub):
    bad = tmp_path / "frame.jpg"
    bad.write_bytes(b"not a jpeg")
    code, out = cli(capsys, "query", built, bad, "--trusted-keys", pub)
    assert code != 0 and str(bad) in out and "query image" in out
