"""The `local` role: per-block local-feature shards, incremental exactly like descriptor shards."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import current, executed, make_cache

from c10.features.descriptor_store import DescriptorStore, Source
from c10.features.embedding import Features
from c10.features.shards import LOCAL_FEATURES, TileRecord, build_shard, read_shard, tile_features
from c10.query.rerank import order_by_matches
from c10.rules.driver import run_build
from c10.store.tiles import Tile
from c10.tools import netgen

K, DIM = 32, 16
LOCAL_TOML = '''
[models.local]
path = "models/local.onnx"
role = "local"
input_size = [64, 64]
'''


@pytest.fixture
def local_cache(tmp_path, inputs, operator_key):
    root = make_cache(tmp_path / "cache", inputs, operator_key)
    netgen.write_local_model(root / "models" / "local.onnx", input_size=64, keypoints=K,
                             desc_dim=DIM)
    text = (root / "c10.toml").read_text()
    (root / "c10.toml").write_text(text.replace("[shards]", LOCAL_TOML.lstrip() + "\n[shards]"))
    return root


def build(root, capsys, ok: bool = True, *args: str) -> list[str]:
    code = run_build(root, list(args) or ["build_cache"])
    out = capsys.readouterr()
    assert (code == 0) == ok, out.out + out.err
    return executed(out.out + out.err)


def local_tasks(names):
    return [n for n in names if n.startswith("shards:local/")]


def test_cold_build_writes_local_shards_then_noop(local_cache, capsys):
    ran = build(local_cache, capsys)
    shards = sorted((local_cache / "shards" / "local" / "15").iterdir())
    assert len(local_tasks(ran)) == len(shards) > 1 and "index:local" not in ran
    rows = np.concatenate([read_shard(p) for p in shards])
    assert len(rows) == len(list((local_cache / "tiles").rglob("*.jpg")))
    assert rows["keypoints"].shape[1:] == (K, 2) and rows["descriptors"].shape[1:] == (K, DIM)
    assert (not list((local_cache / "index").glob("local*"))
            and not (local_cache / ".c10/refs/index/local.faiss.json").exists())
    manifest = (local_cache / "Manifest.json").read_text()
    assert "shards/local/15/" in manifest
    assert build(local_cache, capsys) == ["coverage"]


def test_added_tile_redoes_both_shards_of_its_block(local_cache, capsys, tmp_path):
    tile = sorted((local_cache / "tiles/15").rglob("*.jpg"))[5]
    shutil.move(tile, tmp_path / "saved.jpg")
    build(local_cache, capsys)
    shutil.move(tmp_path / "saved.jpg", tile)
    block = f"15/{int(tile.parent.name) // 4}-{int(tile.stem) // 4}"
    ran = build(local_cache, capsys)
    assert sorted(ran[:2]) == [f"shards:global/{block}", f"shards:local/{block}"]
    assert ran[2:] == ["index:global", "coverage", "manifest"]


def test_the_report_counts_local_features_apart_from_descriptors(local_cache, capsys,
                                                                 tmp_path):
    from c10.report import read_report

    tiles = sorted((local_cache / "tiles/15").rglob("*.jpg"))
    shutil.move(tiles[5], tmp_path / "saved.jpg")
    build(local_cache, capsys)
    report = read_report(local_cache)
    assert report.local_features_generated == report.descriptors_generated == len(tiles) - 1
    assert report.local_features_reused == 0
    shutil.move(tmp_path / "saved.jpg", tiles[5])
    ran = build(local_cache, capsys)
    report = read_report(local_cache)
    assert (report.local_features_generated, report.descriptors_generated) == (1, 1)
    assert report.local_features_reused == report.descriptors_reused > 0  # the block's others
    assert len(local_tasks(ran)) == 1


def test_new_local_model_redoes_only_local_shards(local_cache, capsys):
    build(local_cache, capsys)
    netgen.write_local_model(local_cache / "models" / "local.onnx", input_size=64, keypoints=K,
                             desc_dim=DIM, seed=7)
    ran = build(local_cache, capsys, False)  # the old engine waits for `doit prune`
    assert ran[0] == "engines:local" and local_tasks(ran)
    assert not [n for n in ran if n.startswith(("shards:global/", "index:"))]
    build(local_cache, capsys, True, "prune", "--apply")
    assert build(local_cache, capsys) == ["coverage", "manifest"]


def test_dropping_the_local_model_removes_its_shards(local_cache, capsys):
    build(local_cache, capsys)
    text = (local_cache / "c10.toml").read_text()
    (local_cache / "c10.toml").write_text(text.replace(LOCAL_TOML.lstrip(), ""))
    (local_cache / "models" / "local.onnx").unlink()
    build(local_cache, capsys, False)  # the local engine waits for `doit prune`
    build(local_cache, capsys, True, "prune", "--apply")
    build(local_cache, capsys)
    assert not list((local_cache / "shards").rglob("local/**/*.npy"))


def records(root, tiles):
    import blake3

    return [TileRecord(t, (root / t.path).stat().st_size,
                       blake3.blake3((root / t.path).read_bytes()).hexdigest()) for t in tiles]


def fake_features(n, k=4, d=3, value=0.0):
    return Features(np.full((n, k, 2), value, np.float32), np.full((n, k, d), value, np.float32),
                    np.full((n, k), value, np.float32))


def test_a_block_extracts_only_its_new_tiles_and_is_byte_deterministic(inputs, tmp_path):
    root = tmp_path
    shutil.copytree(inputs / "tiles", root / "tiles")
    paths = sorted((root / "tiles/15").rglob("*.jpg"))[:3]
    tiles = [Tile(15, int(p.parent.name), int(p.stem), p.relative_to(root).as_posix())
             for p in paths]
    asked = []

    def extract(ps):
        asked.append(len(ps))
        return fake_features(len(ps), value=len(asked)).columns()

    def build_local_shard(root, logical, recs, compute, ident):
        """As a build runs it: carrying rows forward from the shard it trusts (the last one)."""
        data = current(root, logical).read_bytes() if (root / ".c10/refs").is_dir() else None
        store = DescriptorStore([Source(root / "earlier.npy", lambda: data, logical)])
        return build_shard(root, logical, recs, compute, ident, LOCAL_FEATURES,
                           store.reuser(ident, LOCAL_FEATURES.columns, logical))

    ident = "ab" * 32
    build_local_shard(root, "shards/local/15/0-0.npy", records(root, tiles[:2]), extract, ident)
    first = current(root, "shards/local/15/0-0.npy").read_bytes()
    stats = build_local_shard(root, "shards/local/15/0-0.npy", records(root, tiles), extract, ident)
    assert asked == [2, 1] and (stats.embedded, stats.reused) == (1, 2)
    feats = tile_features([current(root, "shards/local/15/0-0.npy")], [t.id for t in tiles])
    assert [float(feats[t.id].scores[0]) for t in tiles] == [1.0, 1.0, 2.0]
    stats = build_local_shard(root, "shards/local/15/0-0.npy", records(root, tiles), extract,
                              "cd" * 32)
    assert stats.embedded == 3  # another engine or preprocessing: nothing is reused
    build_local_shard(root, "shards/local/15/0-0.npy", records(root, tiles[:2]),
                      lambda ps: fake_features(len(ps), value=1.0).columns(), ident)
    assert current(root, "shards/local/15/0-0.npy").read_bytes() == first


class CountingMatcher:
    """A matcher stand-in with the real one's interface: matches where descriptors are equal."""

    input_names = ["kpts0", "desc0", "kpts1", "desc1"]
    output_names = ["matches", "scores"]

    def run(self, feeds):
        same = (feeds["desc0"][0][:, None] == feeds["desc1"][0][None]).all(-1)
        matches = np.where(same.any(1), same.argmax(1), -1)[None]
        return [matches, (matches > -1).astype(np.float32)]


def test_rerank_orders_by_matches_then_retrieval_rank():
    query = fake_features(1, k=4)[0]
    feats = {(15, 1, 1): fake_features(1, k=4, value=1.0)[0], (15, 2, 2): query, (15, 3, 3): query}
    out = order_by_matches(CountingMatcher(), query,
                           [((15, 1, 1), 0.9), ((15, 2, 2), 0.8), ((15, 3, 3), 0.7)], feats)
    assert [(v.tile, v.matches, v.rank) for v in out] == [((15, 2, 2), 4, 1), ((15, 3, 3), 4, 2),
                                                          ((15, 1, 1), 0, 0)]
