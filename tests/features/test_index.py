"""The FAISS index: canonical row order, deterministic bytes, saved efSearch, clear errors."""
from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
from conftest import current, make_cache

from c10.config import Index
from c10.errors import IndexBuildError
from c10.features.embedding import l2_normalize
from c10.features.index import build_index
from c10.features.shards import TileRecord, pack_shard
from c10.rules.driver import run_build
from c10.store.refs import current_path
from c10.store.tiles import Tile

IDENT = "ef" * 32


def write_shards(root: Path, n_blocks: int = 5, per_block: int = 40, dim: int = 24,
                 seed: int = 0) -> list[Path]:
    """Shards of random unit descriptors; block b holds tiles x = b, y = 0..per_block-1."""
    rng = np.random.default_rng(seed)
    rels = []
    for b in range(n_blocks):
        recs = [TileRecord(Tile(16, b, y, f"tiles/16/{b}/{y}.jpg"), 100 + y, f"{b:02x}{y:02x}" * 16)
                for y in range(per_block)]
        desc = l2_normalize(rng.standard_normal((per_block, dim)).astype(np.float32))
        rel = root / f"shards/g/16/{b}-0.npy"
        rel.parent.mkdir(parents=True, exist_ok=True)
        rel.write_bytes(pack_shard(recs, [desc], IDENT))
        rels.append(rel)
    return rels


def index_bytes(root: Path) -> tuple[bytes, bytes]:
    return (current(root, "index/g.faiss").read_bytes(),
            current(root, "index/g.ids.npy").read_bytes())


@pytest.mark.parametrize("factory", ["Flat", "HNSW16,Flat"])
def test_same_descriptors_give_the_same_bytes_whatever_the_shard_order(tmp_path, factory):
    rels = write_shards(tmp_path)
    params = Index(factory=factory, ef_construction=40, ef_search=32)
    rows, entries = build_index(tmp_path, "g", rels, params)
    assert rows == 200 and [e["path"] for e in entries] == [
        f"index/g.{entries[0]['blake3'][:16]}.faiss",
        f"index/g.ids.{entries[1]['blake3'][:16]}.npy"]
    first = index_bytes(tmp_path)
    build_index(tmp_path, "g", list(reversed(rels)), params)
    assert index_bytes(tmp_path) == first


def test_rows_map_to_tiles_and_find_themselves(tmp_path):
    rels = write_shards(tmp_path)
    build_index(tmp_path, "g", rels, Index(factory="HNSW16,Flat", ef_search=48))
    index = faiss.read_index(str(current_path(tmp_path, "index/g.faiss")))
    ids = np.load(current_path(tmp_path, "index/g.ids.npy"))
    assert ([tuple(map(int, r)) for r in ids]
            == sorted((16, b, y) for b in range(5) for y in range(40)))
    assert faiss.downcast_index(index).hnsw.efSearch == 48
    shard = np.load(rels[3])
    _, rows = index.search(np.ascontiguousarray(shard["desc"][:10]), 1)
    assert [tuple(map(int, ids[r])) for r in rows[:, 0]] == [(16, 3, y) for y in range(10)]


def test_l2_metric_and_bad_factory(tmp_path):
    rels = write_shards(tmp_path, n_blocks=2)
    assert build_index(tmp_path, "g", rels, Index(metric="l2"))[0] == 80
    with pytest.raises(IndexBuildError, match="index.factory = 'HNSW-oops'"):
        build_index(tmp_path, "g", rels, Index(factory="HNSW-oops"))


def test_no_descriptors_says_fetch_tiles(tmp_path):
    with pytest.raises(IndexBuildError, match="fetch tiles"):
        build_index(tmp_path, "g", [], Index())


def test_two_clean_builds_give_identical_shards_and_index(tmp_path, inputs, operator_key, capsys):
    roots = [make_cache(tmp_path / name, inputs, operator_key, factory="HNSW16,Flat")
             for name in ("a", "b")]
    for root in roots:
        assert run_build(root) == 0, capsys.readouterr().out
    a, b = ({p.relative_to(r).as_posix(): p.read_bytes() for sub in ("shards", "index")
             for p in sorted((r / sub).rglob("*")) if p.is_file()} for r in roots)
    assert len(a) > 3 and a == b
