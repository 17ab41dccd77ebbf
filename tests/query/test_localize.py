"""Frames localize on a real built cache (generated local and matcher networks): `c10 query
--rerank` re-ranks by RANSAC inliers and reports a position, `c10 selftest --frames` measures it."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_cache

from c10.cli import main as c10_main
from c10.query.flight import FlightCache
from c10.query.frames import render
from c10.query.geo import distance_m, tile_latlon, tile_size_m
from c10.rules.driver import run_build
from c10.store.tiles import TileId
from c10.tools import netgen

pytestmark = pytest.mark.timeout(120)

# The local model sees tiles at their own 128 px, so a frame of whole-pixel shifts of the mosaic
# gives the generated network (not rotation-robust, unlike ALIKED) the same keypoints back.
K, DIM, SIZE = 64, 16, 128
MODELS_TOML = f'''
[models.local]
path = "models/local.onnx"
role = "local"
input_size = [{SIZE}, {SIZE}]

[models.matcher]
path = "models/matcher.onnx"
role = "matcher"
input_size = []
'''


def with_local_models(root, stride: str = "1"):
    """A cache of conftest.make_cache with the generated local and matcher networks."""
    netgen.write_local_model(root / "models" / "local.onnx", input_size=SIZE, keypoints=K,
                             desc_dim=DIM)
    netgen.write_matcher_model(root / "models" / "matcher.onnx", keypoints=K, desc_dim=DIM)
    text = (root / "c10.toml").read_text()
    (root / "c10.toml").write_text(text.replace(
        "[shards]", MODELS_TOML.lstrip() + f"\n[shards]\nstride = {stride}", 1))
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory, inputs, operator_key):
    root = with_local_models(make_cache(tmp_path_factory.mktemp("localize") / "cache", inputs,
                                        operator_key))
    assert run_build(root) == 0
    return root


@pytest.fixture(scope="module")
def pub(operator_key):
    return operator_key[1]


def cli(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    code = c10_main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out + out.err


def inner_tile(cache) -> TileId:
    """A tile whose eight neighbours the cache holds."""
    tiles = set(cache.tiles)
    return next(t for t in sorted(tiles)
                if all(TileId(t.z, t.x + i, t.y + j) in tiles for i in (-1, 0, 1)
                       for j in (-1, 0, 1)))


@pytest.fixture(scope="module")
def frame(built, pub, tmp_path_factory):
    """A frame one tile wide centred on a tile corner: a quarter of each of four tiles."""
    cache = FlightCache.open(built, [pub])
    tile = inner_tile(cache)
    path = tmp_path_factory.mktemp("frames") / "corner.png"
    render(cache.load_tile, tile.z, tile.x + 0.0, tile.y + 0.0, 1.0, 0.0).save(path)
    return path, tile


def test_query_rerank_reports_where_a_four_tile_frame_is(built, pub, frame, capsys):
    path, tile = frame
    code, out = cli(capsys, "query", built, path, "--rerank", "--json", "--trusted-keys", pub)
    assert code == 0, out
    data = json.loads(out)
    assert len(data["hits"]) == min(50, len(FlightCache.open(built, [pub]).searcher()[0].ids))
    pos = data["position"]
    assert pos is not None and data["position_reason"] is None
    assert set(pos) >= {"lat", "lon", "heading", "scale", "inliers", "confidence"}
    size = tile_size_m(tile.z, pos["lat"])
    assert distance_m((pos["lat"], pos["lon"]), tile_latlon(tile.z, tile.x, tile.y)) < size / 50
    assert min(pos["heading"], 360 - pos["heading"]) < 1 and pos["scale"] == pytest.approx(1, 0.02)
    assert pos["inliers"] >= 12 and 0 < pos["confidence"] <= 1
    best = data["best"]
    # the top answer is a footprint that holds the frame's centre (a tile's corner: any of four)
    assert best == data["reranked"][0] and best["inliers"] > 0
    assert (best["x"] - tile.x, best["y"] - tile.y) in {(0, 0), (-1, 0), (0, -1), (-1, -1)}
    inliers = [v["inliers"] for v in data["reranked"]]
    assert inliers[0] == max(inliers)
    assert data["matcher"] == "mnn" and set(data["seconds"]) == {"local", "features", "match",
                                                                  "ransac"}
    code, text = cli(capsys, "query", built, path, "--rerank", "--trusted-keys", pub)
    lines = [line for line in text.splitlines() if line.startswith("position:")]
    assert code == 0 and len(lines) == 1 and f"{pos['inliers']} inliers" in lines[0]
    assert "heading" in lines[0] and "confidence" in lines[0] and "lat 50." in lines[0]
    # the 0.1 name still re-ranks
    code, old = cli(capsys, "query", built, path, "--verify", "--json", "--trusted-keys", pub)
    assert code == 0 and json.loads(old)["position"] == pos


def test_no_model_fits_a_frame_from_elsewhere(built, pub, capsys, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(noise, "RGB").save(tmp_path / "noise.png")
    code, out = cli(capsys, "query", built, tmp_path / "noise.png", "--rerank", "--json",
                    "--trusted-keys", pub)
    assert code == 0, out
    data = json.loads(out)
    assert data["position"] is None and "inliers" in data["position_reason"]
    code, text = cli(capsys, "query", built, tmp_path / "noise.png", "--rerank",
                     "--trusted-keys", pub)
    assert code == 0 and "position: none (no candidate's matches fit" in text


def test_lightglue_matching_runs_the_signed_matcher(built, pub, frame, capsys):
    path, tile = frame
    code, out = cli(capsys, "query", built, path, "--rerank", "--matcher", "lightglue", "--json",
                    "--trusted-keys", pub)
    assert code == 0, out
    data = json.loads(out)
    assert data["matcher"] == "lightglue" and len(data["hits"]) == 10  # its default -k
    assert all(v["matches"] <= K for v in data["reranked"])


def test_selftest_frames_reports_recall_and_position_error(built, pub, capsys):
    keys = {"recall_at_1", "recall_at_5", "position_error_m_median", "position_error_m_p90",
            "tile_size_m"}
    code, out = cli(capsys, "selftest", built, "--frames", "-n", "12", "--degrees", "0",
                    "--json", "--trusted-keys", pub)
    assert code == 0, out
    plain = json.loads(out)
    assert set(plain) >= keys and plain["n"] == 12 and plain["k"] == 0
    assert plain["position_source"] == "footprint" and plain["located"] is None
    assert 0 <= plain["recall_at_1"] <= plain["recall_at_5"] <= 1
    assert plain["tile_size_m"] == pytest.approx(tile_size_m(15, 50.45), rel=0.01)
    code, out = cli(capsys, "selftest", built, "--frames", "--rerank", "-n", "12", "--degrees",
                    "0", "--json", "--trusted-keys", pub)
    assert code == 0, out
    fitted = json.loads(out)
    assert set(fitted) >= keys and fitted["position_source"] == "fit" and fitted["k"] == 50
    assert fitted["recall_at_1"] >= plain["recall_at_1"] and fitted["located"] > 0
    assert fitted["position_error_m_median"] < fitted["tile_size_m"] / 10
    code, text = cli(capsys, "selftest", built, "--frames", "-n", "4", "--trusted-keys", pub)
    assert code == 0 and "recall@1" in text and "no fit without --rerank" in text


def test_selftest_rerank_without_frames_says_add_frames(built, pub, capsys):
    code, out = cli(capsys, "selftest", built, "--rerank", "--trusted-keys", pub)
    assert code == 2 and "--frames" in out and "Traceback" not in out
    code, out = cli(capsys, "selftest", built, "--frames", "--degrees", "60", "--trusted-keys",
                    pub)
    assert code == 2 and "--degrees 60" in out and "between 0 and 45" in out


def test_rerank_on_a_cache_without_local_features_names_the_roles(tmp_path, inputs, operator_key,
                                                                  capsys, frame):
    root = make_cache(tmp_path / "cache", inputs, operator_key)
    assert run_build(root) == 0
    key = operator_key[1]
    code, out = cli(capsys, "query", root, frame[0], "--rerank", "--trusted-keys", key)
    assert code == 2 and 'role = "local"' in out and "c10 export-models" in out
    assert "matcher" not in out.split("(missing")[1]  # mutual neighbours need no matcher
    code, out = cli(capsys, "query", root, frame[0], "--rerank", "--matcher", "lightglue",
                    "--trusted-keys", key)
    assert code == 2 and "missing: local, matcher" in out


def test_with_windows_the_frame_is_found_as_the_window_centred_on_it(tmp_path, inputs,
                                                                      operator_key, capsys,
                                                                      frame):
    """shards.stride = 0.5: rows are windows; the one whose footprint centres on the frame (a
    tile corner) answers, with the tiles' keypoints shifted into it."""
    root = with_local_models(make_cache(tmp_path / "cache", inputs, operator_key), "0.5")
    assert run_build(root) == 0
    path, tile = frame
    code, out = cli(capsys, "query", root, path, "--rerank", "--json", "--trusted-keys",
                    operator_key[1])
    assert code == 0, out
    data = json.loads(out)
    assert any(h["fx"] % 1 for h in data["hits"])  # windows were retrieved
    best = data["best"]
    assert (best["fx"], best["fy"]) == (tile.x - 0.5, tile.y - 0.5)
    assert (best["x"], best["y"]) == (tile.x, tile.y)  # the tile under the window's centre
    assert (best["lat"], best["lon"]) == pytest.approx(tile_latlon(tile.z, tile.x, tile.y))
    pos = data["position"]
    assert distance_m((pos["lat"], pos["lon"]), tile_latlon(tile.z, tile.x, tile.y)) < \
        tile_size_m(tile.z, pos["lat"]) / 50
    code, text = cli(capsys, "query", root, path, "--trusted-keys", operator_key[1])
    assert code == 0 and "footprint x,y" in text and f"{tile.x - 0.5:g},{tile.y - 0.5:g}" in text
