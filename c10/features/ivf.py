"""An IVF index that grows: a trained quantizer kept across builds, per-shard encodings."""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import blake3
import numpy as np

from c10.canonical import canonical_json
from c10.config import Index
from c10.errors import IndexBuildError

# Bump when the trained file, an encoding or their assembly changes meaning: every IVF index of a
# cache then retrains once.
IVF_SCHEMA = 1
SAMPLE_SEED = 0
ID_FIELDS = (("z", "<u1"), ("x", "<u4"), ("y", "<u4"))


def train_key(params: Index, dim: int) -> dict:
    """What a trained quantizer is a function of, besides its sample: a change retrains."""
    return {"schema": IVF_SCHEMA, "factory": params.factory, "metric": params.metric, "dim": dim,
            "train_sample": params.train_sample, "train_generation": params.train_generation}


def sample_rows(n: int, size: int) -> np.ndarray:
    """The rows (in canonical order) a quantizer is trained on: a fixed-seed choice, sorted."""
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(SAMPLE_SEED).choice(n, size=size, replace=False))


def train(desc: np.ndarray, ids: np.ndarray, params: Index) -> tuple[bytes, bytes]:
    """(trained empty index, its meta JSON) from all rows of the model in canonical order:
    k-means and codebooks on a deterministic sample, one thread (same sample, same bytes)."""
    import faiss

    from c10.features.index import new_index

    faiss.omp_set_num_threads(1)
    rows = sample_rows(len(desc), params.train_sample)
    sample = np.ascontiguousarray(desc[rows])
    index = new_index(desc.shape[1], params)
    ivf = faiss.extract_index_ivf(index)
    if len(sample) < ivf.nlist:
        raise IndexBuildError(f"index.factory = {params.factory!r} needs at least {ivf.nlist} "
                              f"descriptors to train, the cache has {len(desc)}",
                              "use a smaller IVF nlist or index.factory = \"HNSW32,Flat\"")
    index.train(sample)
    data = faiss.serialize_index(index).tobytes()
    digest = blake3.blake3(sample.tobytes() + ids[rows].tobytes()).hexdigest()
    trained = Trained(data, b"{}")
    meta = train_key(params, desc.shape[1]) | {
        "faiss": faiss.__version__, "sample": {"rows": len(rows), "of": len(desc),
                                               "seed": SAMPLE_SEED, "blake3": digest},
        "coarse_error": float(np.mean(trained.coarse_error(sample, trained.list_numbers(
            np.ascontiguousarray(index.sa_encode(sample))))))}
    return data, canonical_json(meta)


@dataclass
class Trained:
    """A trained, empty IVF index (its serialized bytes) and what it was trained on."""

    data: bytes
    meta_json: bytes

    @cached_property
    def meta(self) -> dict:
        return json.loads(self.meta_json)

    @cached_property
    def digest(self) -> str:
        return blake3.blake3(self.data).hexdigest()

    @cached_property
    def index(self):
        import faiss

        faiss.omp_set_num_threads(1)
        return faiss.deserialize_index(np.frombuffer(self.data, np.uint8))

    @cached_property
    def ivf(self):
        import faiss

        return faiss.extract_index_ivf(self.index)

    @cached_property
    def centroids(self) -> np.ndarray:
        return self.ivf.quantizer.reconstruct_n(0, self.ivf.nlist)

    def dtype(self) -> np.dtype:
        return np.dtype([*ID_FIELDS, ("dhash", "<u8", (2,)), ("err", "<f4"),
                         ("code", "u1", (self.index.sa_code_size(),))])

    def list_numbers(self, codes: np.ndarray) -> np.ndarray:
        """The inverted list of each standalone code (its first bytes, little-endian)."""
        width = self.ivf.coarse_code_size()
        return sum(codes[:, i].astype(np.int64) << (8 * i) for i in range(width))

    def coarse_error(self, desc: np.ndarray, lists: np.ndarray) -> np.ndarray:
        """Squared distance of each descriptor to its list's centroid: the drift measure."""
        return np.square(desc - self.centroids[lists]).sum(axis=1).astype(np.float32)

    def encode(self, desc: np.ndarray, ids: np.ndarray, previous: np.ndarray | None = None
               ) -> tuple[bytes, int]:
        """One shard's rows as an encoding (.npy: ids, descriptor hash, coarse error, standalone
        code) and how many rows FAISS encoded: a row of `previous` (the shard's last encoding
        with this quantizer) with the same id and descriptor keeps its code."""
        desc = np.ascontiguousarray(desc, dtype=np.float32)
        rows = np.zeros(len(desc), self.dtype())
        for name, _ in ID_FIELDS:
            rows[name] = ids[name]
        rows["dhash"] = _row_hashes(desc)
        todo = np.ones(len(rows), bool)
        if previous is not None and len(previous) and len(rows):
            old = {_row_key(r): i for i, r in enumerate(previous)}
            for i, row in enumerate(rows):
                j = old.get(_row_key(row))
                if j is not None:
                    rows[i]["err"], rows[i]["code"], todo[i] = previous[j]["err"], \
                        previous[j]["code"], False
        if todo.any():
            codes = self.index.sa_encode(desc[todo])
            rows["code"][todo] = codes
            rows["err"][todo] = self.coarse_error(desc[todo], self.list_numbers(codes))
        buf = io.BytesIO()
        np.save(buf, rows, allow_pickle=False)
        return buf.getvalue(), int(todo.sum())

    def read_encoding(self, data: bytes) -> np.ndarray:
        rows = np.load(io.BytesIO(data), allow_pickle=False)
        if rows.dtype != self.dtype():
            raise ValueError(f"encoding of dtype {rows.dtype}, expected {self.dtype()}")
        return rows

    def assemble(self, encodings: Sequence[np.ndarray],
                 nprobe: int) -> tuple[bytes, np.ndarray, float]:
        """(index bytes, id map, mean coarse error) from shard encodings in any order: rows sorted
        by (z, x, y), added list by list in that order, as one add() of the sorted rows would;
        nprobe is saved with the index (the aircraft searches with it)."""
        import faiss

        from c10.features.index import IDS_DTYPE

        rows = np.concatenate(encodings) if encodings else np.zeros(0, self.dtype())
        if not len(rows):
            raise IndexBuildError("no descriptors to index: no tiles in scope; "
                                  "fetch tiles into tiles/ first")
        rows = rows[np.lexsort((rows["y"], rows["x"], rows["z"]))]
        index = faiss.deserialize_index(np.frombuffer(self.data, np.uint8))
        index.add_sa_codes(np.ascontiguousarray(rows["code"]), np.arange(len(rows), dtype="int64"))
        faiss.extract_index_ivf(index).nprobe = nprobe
        ids = np.zeros(len(rows), IDS_DTYPE)
        for name in IDS_DTYPE.names:
            ids[name] = rows[name]
        return (faiss.serialize_index(index).tobytes(), ids,
                float(rows["err"].astype(np.float64).mean()))

    def drift(self, mean_error: float) -> float:
        """Mean coarse error of the indexed rows over that of the training sample."""
        base = self.meta.get("coarse_error") or 0.0
        return mean_error / base if base > 0 else 1.0

    def stale(self, params: Index, dim: int) -> str | None:
        """Why this quantizer must be retrained for these parameters, or None."""
        key = train_key(params, dim)
        diff = sorted(k for k, v in key.items() if self.meta.get(k) != v)
        return f"{', '.join(diff)} changed" if diff else None


def _row_hashes(desc: np.ndarray) -> np.ndarray:
    """A 128-bit hash of each descriptor's bytes (blake2b: the standard library's fastest here)."""
    import hashlib

    out = np.zeros((len(desc), 2), "<u8")
    view = memoryview(np.ascontiguousarray(desc)).cast("B")
    width = desc.shape[1] * 4 if desc.ndim == 2 else 0
    for i in range(len(desc)):
        out[i] = np.frombuffer(hashlib.blake2b(view[i * width:(i + 1) * width],
                                               digest_size=16).digest(), "<u8")
    return out


def _row_key(row) -> tuple:
    return int(row["z"]), int(row["x"]), int(row["y"]), int(row["dhash"][0]), int(row["dhash"][1])
