"""The growing IVF index on real FAISS: per-shard encodings assembled into the bytes of a clean
build, unchanged rows keep their codes, and the quantizer retrains only when asked, on other
descriptors, or past the drift threshold."""
from __future__ import annotations

import io

import numpy as np
import pytest

from c10.config import Index
from c10.features.embedding import l2_normalize
from c10.features.index import Source, grow_index
from c10.features.shards import TileRecord, pack_shard
from c10.store.tiles import Tile

IDENT = "ef" * 32
PARAMS = Index(factory="IVF8,SQ8", nprobe=4)


class Store:
    """The encoding store's contract, in memory (rules/ivf.py keeps them under .c10/ivf/)."""

    def __init__(self):
        self.files: dict[tuple[str, str, str], bytes] = {}

    def get(self, logical, key, quantizer):
        return self.files.get((logical, key, quantizer))

    def previous(self, logical, key, quantizer):
        return next((v for (lg, _, q), v in self.files.items()
                     if lg == logical and q == quantizer), None)

    def put(self, logical, key, quantizer, data):
        self.files = {k: v for k, v in self.files.items() if k[0] != logical}
        self.files[(logical, key, quantizer)] = data


def shard(b: int, ys, dim: int = 16, seed: int = 0) -> Source:
    """Block b: tiles x = b, y in ys; each tile's descriptor a function of (b, y) only, near one
    of 8 centres drawn from `seed` (as imagery of one kind clusters)."""
    centres = np.random.default_rng(seed).standard_normal((8, dim))
    desc = np.stack([centres[y % 8] + 0.15 * np.random.default_rng([seed, b, y]).standard_normal(
        dim) for y in ys])
    desc = l2_normalize(desc.astype(np.float32))
    recs = [TileRecord(Tile(16, b, y, f"tiles/16/{b}/{y}.jpg"), 100, f"{b:02x}{y:02x}" * 16)
            for y in ys]
    data = pack_shard(recs, [desc], IDENT)
    import blake3

    return Source(f"shards/g/16/{b}-0.npy", blake3.blake3(data).hexdigest(), 1, lambda: data)


def blocks(n: int = 6, per: int = 40, **kw) -> list[Source]:
    return [shard(b, range(per), **kw) for b in range(n)]


def test_incremental_update_equals_a_clean_build_with_the_same_quantizer():
    store = Store()
    first = grow_index(blocks(), PARAMS, None, store)
    assert first.stats["trained"] == "no trained quantizer" and first.stats["rows_encoded"] == 240
    # tiles added to block 1, removed from block 3, block 5 gone, block 6 new
    changed = blocks()
    changed[1] = shard(1, range(50))
    changed[3] = shard(3, range(0, 40, 2))
    changed[5] = shard(6, range(40))
    grown = grow_index(changed, PARAMS, first.trained, store)
    assert grown.stats["trained"] is None
    # only the new rows were encoded: the 10 added to block 1 and block 6's 40
    assert grown.stats["rows_encoded"] == 50
    clean = grow_index(changed, PARAMS, first.trained, Store())
    assert clean.stats["rows_encoded"] == 230
    assert grown.index == clean.index and (grown.ids == clean.ids).all()
    assert grown.index != first.index
    assert [tuple(map(int, r)) for r in grown.ids] == sorted(
        (16, b, y) for b, ys in [(0, range(40)), (1, range(50)), (2, range(40)),
                                 (3, range(0, 40, 2)), (4, range(40)), (6, range(40))]
        for y in ys)


def test_the_assembled_index_finds_each_tile_and_keeps_nprobe():
    import faiss

    grown = grow_index(blocks(), PARAMS, None, Store())
    index = faiss.deserialize_index(np.frombuffer(grown.index, np.uint8))
    assert faiss.extract_index_ivf(index).nprobe == 4 and index.ntotal == 240
    src = np.load(io.BytesIO(blocks()[2].read()))
    _, rows = index.search(np.ascontiguousarray(src["desc"][:10]), 1)
    assert [tuple(map(int, grown.ids[r])) for r in rows[:, 0]] == [(16, 2, y) for y in range(10)]


def test_a_bumped_train_generation_or_other_parameters_retrain():
    first = grow_index(blocks(), PARAMS, None, Store())
    again = Index(factory="IVF8,SQ8", nprobe=8)  # nprobe is a search setting: no retrain
    assert grow_index(blocks(), again, first.trained, Store()).stats["trained"] is None
    asked = Index(factory="IVF8,SQ8", nprobe=4, train_generation=2)
    grown = grow_index(blocks(), asked, first.trained, Store())
    assert grown.stats["trained"] == "train_generation changed"
    assert grown.trained.meta["train_generation"] == 2
    other = Index(factory="IVF4,SQ8")
    assert grow_index(blocks(), other, first.trained, Store()).stats["trained"] == \
        "factory changed"


def test_other_descriptor_sizes_retrain():
    first = grow_index(blocks(), PARAMS, None, Store())
    grown = grow_index(blocks(dim=24), PARAMS, first.trained, Store())
    assert grown.stats["trained"] == "descriptors of 24 floats, the quantizer's 16"
    assert grown.trained.index.d == 24


def test_drift_past_the_threshold_retrains_and_below_it_does_not():
    store = Store()
    first = grow_index(blocks(per=60), PARAMS, None, store)
    assert first.stats["drift"] == pytest.approx(1.0)
    # new imagery: other descriptors far from the trained centroids
    moved = blocks(per=60) + [shard(b, range(60), seed=9) for b in range(10, 20)]
    kept = grow_index(moved, Index(factory="IVF8,SQ8", retrain_drift=0), first.trained, store)
    assert kept.stats["trained"] is None and kept.stats["drift"] > 1.25
    grown = grow_index(moved, PARAMS, first.trained, store)
    assert grown.stats["trained"].startswith("drift ") and grown.trained.digest != \
        first.trained.digest
    assert grown.stats["drift"] < kept.stats["drift"]


@pytest.mark.parametrize("factory, grows", [
    ("IVF1024,PQ32", True), ("IVF4096,SQ8", True), ("IVF64_HNSW32,Flat", True),
    ("HNSW32,Flat", False), ("Flat", False), ("OPQ16,IVF256,PQ16", False), ("IVF256", False),
])
def test_which_factories_grow(factory, grows):
    assert Index(factory=factory).grows is grows


def test_window_rows_count_in_their_unit_and_sort_among_the_tiles():
    import dataclasses

    tiles = [dataclasses.replace(s, scale=2) for s in blocks(n=2, per=4)]
    windows = [shard(0, range(1, 4))]  # stands for a window shard: ids already in 1/2 tile
    windows = [dataclasses.replace(windows[0], logical="shards/g/16/0-0.windows.npy")]
    grown = grow_index(tiles + windows, PARAMS.__class__(factory="IVF2,SQ8"), None, Store())
    rows = [tuple(map(int, r)) for r in grown.ids]
    assert rows == sorted([(16, 2 * b, 2 * y) for b in range(2) for y in range(4)]
                          + [(16, 0, y) for y in range(1, 4)])


@pytest.mark.parametrize("factory, says", [
    ("IVF1024,SQ8", "needs at least 1024 descriptors"),
    ("IVF4,PQ8", "cannot be trained on 240 descriptors"),
])
def test_too_few_rows_to_train_name_the_factory(factory, says):
    from c10.errors import IndexBuildError

    with pytest.raises(IndexBuildError, match=f"index.factory = '{factory}' {says}") as info:
        grow_index(blocks(), Index(factory=factory), None, Store())
    assert "c10.toml" in str(info.value) or "HNSW32,Flat" in str(info.value)
