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

IDS_DTYPE = np.dtype([("z", "<u1"), ("x", "<u4"), ("y", "<u4")])



def load_descriptors(shards: Sequence[Path | BinaryIO]) -> tuple[np.ndarray, np.ndarray]:
    """Descriptors and tile ids of all shards (paths or open files), sorted by (z, x, y)."""
    parts = [read_shard(p) for p in shards]
    if not parts or not sum(len(p) for p in parts):
        raise IndexBuildError("no descriptors to index: no tiles in scope; "
                              "fetch tiles into tiles/ first")
    rows = np.concatenate(parts)
    rows = rows[np.lexsort((rows["y"], rows["x"], rows["z"]))]
    ids = np.zeros(len(rows), IDS_DTYPE)
    for name in IDS_DTYPE.names:
        ids[name] = rows[name]
    return np.ascontiguousarray(rows["desc"], dtype=np.float32), ids


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


def build_index(root: Path, model: str, shards: Sequence[Path | BinaryIO],
                params: Index) -> tuple[int, list[dict]]:
    """Write the model's index and id map under their content names: (rows, their two entries)."""
    import faiss

    desc, ids = load_descriptors(shards)
    index = make_index(desc, params)
    index_rel, ids_rel = index_relpaths(model)
    buf = io.BytesIO()
    np.save(buf, ids, allow_pickle=False)
    return len(ids), [refs.publish(root, index_rel, faiss.serialize_index(index).tobytes()),
                      refs.publish(root, ids_rel, buf.getvalue())]
