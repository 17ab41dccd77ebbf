"""The FAISS index of a model: its shards' rows in canonical order, deterministic bytes."""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Protocol, Sequence

import blake3
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


def new_index(dim: int, params: Index):
    """An empty FAISS index of index.factory (HNSW settings applied)."""
    import faiss

    metric = faiss.METRIC_INNER_PRODUCT if params.metric == "ip" else faiss.METRIC_L2
    try:
        index = faiss.index_factory(dim, params.factory, metric)
    except RuntimeError as exc:
        raise IndexBuildError(f"index.factory = {params.factory!r} is not a FAISS "
                              f"index_factory string ({str(exc).splitlines()[0]}); "
                              "fix c10.toml") from None
    _set_hnsw(index, params, faiss)
    return index


def make_index(desc: np.ndarray, params: Index):
    """A FAISS index over `desc` built single-threaded so the same input gives the same bytes."""
    import faiss

    faiss.omp_set_num_threads(1)
    index = new_index(desc.shape[1], params)
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


@dataclass(frozen=True)
class Source:
    """One shard of the index: its logical path and blake3 (the encoding's key), how its ids
    scale (div for tile shards, 1 for window shards) and how to read its bytes (only when not
    encoded yet)."""

    logical: str
    digest: str
    scale: int
    read: Callable[[], bytes]


class EncodingStore(Protocol):
    """Where shard encodings are kept: by the shard's logical path and the encoding's key."""

    def get(self, logical: str, key: str, quantizer: str) -> bytes | None: ...
    def previous(self, logical: str, key: str, quantizer: str) -> bytes | None: ...
    def put(self, logical: str, key: str, quantizer: str, data: bytes) -> None: ...


@dataclass
class Grown:
    """What grow_index made: the index and id map, the trained quantizer it used, and how."""

    index: bytes
    ids: np.ndarray
    trained: object  # c10.features.ivf.Trained
    stats: dict = field(default_factory=dict)


def grow_index(sources: Sequence[Source], params: Index, trained,
               store: EncodingStore) -> Grown:
    """An IVF index from per-shard encodings: each shard not yet encoded with this quantizer is
    encoded and stored, then all are assembled in (z, x, y) order, so the bytes equal a clean
    build's with the same quantizer. `trained` (an ivf.Trained or None) is reused unless its
    parameters or the descriptor size changed, or the drift passes index.retrain_drift."""
    reason = "no trained quantizer" if trained is None else trained.stale(params, trained.index.d)
    for _ in range(3):  # a retrain for another descriptor size or for drift passes again
        if reason:
            trained = _train(sources, params)
        try:
            encodings, encoded = _encodings(sources, trained, store)
        except _OtherSize as exc:
            if reason:  # just trained on these shards: they disagree among themselves
                raise IndexBuildError(f"the model's shards hold descriptors of different sizes "
                                      f"({exc})", then="run `doit build_cache` again") from None
            reason = str(exc)
            continue
        index, ids, error = trained.assemble(encodings, params.nprobe)
        drift = trained.drift(error)
        if reason or not 0 < params.retrain_drift < drift:
            break
        reason = f"drift {drift:.3f} > index.retrain_drift = {params.retrain_drift}"
    stats = {"trained": reason, "rows_encoded": encoded, "rows": len(ids),
             "drift": round(drift, 4)}
    return Grown(index, ids, trained, stats)


class _OtherSize(Exception):
    pass


def _encodings(sources: Sequence[Source], trained, store: EncodingStore):
    """(each shard's encoding, rows encoded by FAISS now) with this quantizer: a changed shard
    keeps the codes of its unchanged rows from its last encoding."""
    out, encoded = [], 0
    for source in sources:
        key = encoding_key(source, trained.digest)
        data = store.get(source.logical, key, trained.digest)
        if data is None:
            desc, ids = _rows(source)
            if desc.shape[1] != trained.index.d:
                raise _OtherSize(f"descriptors of {desc.shape[1]} floats, the quantizer's "
                                 f"{trained.index.d}")
            data, n = trained.encode(desc, ids, _previous(store, source, key, trained))
            encoded += n
            store.put(source.logical, key, trained.digest, data)
        out.append(trained.read_encoding(data))
    return out, encoded


def _previous(store: EncodingStore, source: Source, key: str, trained) -> np.ndarray | None:
    data = store.previous(source.logical, key, trained.digest)
    try:
        return trained.read_encoding(data) if data is not None else None
    except ValueError:  # another quantizer's or schema's: encode every row
        return None


def encoding_key(source: Source, trained_digest: str) -> str:
    """A shard's encoding is a function of its bytes, its id scale and the quantizer."""
    return blake3.blake3(f"{source.digest}:{source.scale}:{trained_digest}".encode()).hexdigest()


def _rows(source: Source) -> tuple[np.ndarray, np.ndarray]:
    """(descriptors, ids) of one shard, its ids scaled."""
    ids, desc = _ids(read_shard(io.BytesIO(source.read())), source.scale)
    return np.ascontiguousarray(desc, dtype=np.float32), ids


def _train(sources: Sequence[Source], params: Index):
    from c10.features import ivf

    parts = [_rows(s) for s in sources]
    if not parts or not sum(len(p[1]) for p in parts):
        raise IndexBuildError("no descriptors to index: no tiles in scope; "
                              "fetch tiles into tiles/ first")
    ids = np.concatenate([p[1] for p in parts])
    order = np.lexsort((ids["y"], ids["x"], ids["z"]))
    desc = np.concatenate([p[0] for p in parts])[order]
    return ivf.Trained(*ivf.train(desc, ids[order], params))
