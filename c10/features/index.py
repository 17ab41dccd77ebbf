"""The FAISS index of a model: all its shards in canonical order, one add(), deterministic bytes."""
from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np

from c10.config import Index
from c10.errors import IndexBuildError
from c10.features.shards import read_shard
from c10.store import refs
from c10.store.layout import index_relpaths

# Row -> (z, x, y) in units of 1/div tile (div = 1 / shards.stride, signed in the runtime spec): a
# row's footprint is the one-tile square whose top-left corner is (x/div, y/div) in tile
# coordinates; a tile's row is (z, x*div, y*div), a window's its id (c10.features.windows).
IDS_DTYPE = np.dtype([("z", "<u1"), ("x", "<u4"), ("y", "<u4")])


def load_descriptors(shards: Sequence[Path | BinaryIO], windows: Sequence[Path | BinaryIO] = (),
                     div: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Descriptors and ids of all tile shards and window shards (paths or open files), sorted by
    (z, x, y) in 1/div tile (div = 1, no windows: tile ids, as before windows)."""
    parts = [read_shard(p) for p in shards]
    if not parts or not sum(len(p) for p in parts):
        raise IndexBuildError("no descriptors to index: no tiles in scope; "
                              "fetch tiles into tiles/ first")
    tiles = np.concatenate(parts)
    parts = [_ids(tiles, div)] + [_ids(read_shard(p), 1) for p in windows]
    ids = np.concatenate([p[0] for p in parts])
    desc = np.concatenate([p[1] for p in parts]) if windows else parts[0][1]
    order = np.lexsort((ids["y"], ids["x"], ids["z"]))
    return np.ascontiguousarray(desc[order], dtype=np.float32), ids[order]


def _ids(rows: np.ndarray, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids scaled by `scale`, descriptors) of shard rows."""
    ids = np.zeros(len(rows), IDS_DTYPE)
    for name in IDS_DTYPE.names:
        ids[name] = rows[name] * scale if name != "z" else rows[name]
    return ids, rows["desc"]


def make_index(desc: np.ndarray, params: Index):
    """A FAISS index over `desc` built single-threaded so the same input gives the same bytes."""
    import faiss

    faiss.omp_set_num_threads(1)
    metric = faiss.METRIC_INNER_PRODUCT if params.metric == "ip" else faiss.METRIC_L2
    try:
        index = faiss.index_factory(desc.shape[1], params.factory, metric)
    except RuntimeError as exc:
        raise IndexBuildError(f"index.factory = {params.factory!r} is not a FAISS "
                              f"index_factory string ({str(exc).splitlines()[0]}); "
                              "fix c10.toml") from None
    _set_hnsw(index, params, faiss)
    if not index.is_trained:
        index.train(desc)
    index.add(desc)
    return index


def _set_hnsw(index, params: Index, faiss) -> None:
    # efSearch is saved with the index, so queries on the aircraft use the configured value.
    hnsw = getattr(faiss.downcast_index(index), "hnsw", None)
    if hnsw is not None:
        hnsw.efConstruction = params.ef_construction
        hnsw.efSearch = params.ef_search


def build_index(root: Path, model: str, shards: Sequence[Path | BinaryIO], params: Index,
                windows: Sequence[Path | BinaryIO] = (), div: int = 1) -> tuple[int, list[dict]]:
    """Write the model's index and id map under their content names: (rows, their two entries).
    windows, div: the model's window shards and the stride's 1/div (ids in 1/div tile)."""
    import faiss

    desc, ids = load_descriptors(shards, windows, div)
    index = make_index(desc, params)
    index_rel, ids_rel = index_relpaths(model)
    buf = io.BytesIO()
    np.save(buf, ids, allow_pickle=False)
    return len(ids), [refs.publish(root, index_rel, faiss.serialize_index(index).tobytes()),
                      refs.publish(root, ids_rel, buf.getvalue())]
