"""An IVF index that grows: a trained quantizer kept across builds, per-shard encodings."""
from __future__ import annotations

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
    try:
        index.train(sample)
    except RuntimeError as exc:  # e.g. fewer rows than a PQ codebook's 256 centroids
        raise IndexBuildError(f"index.factory = {params.factory!r} cannot be trained on "
                              f"{len(sample)} descriptors ({str(exc).splitlines()[0]})",
                              "raise index.train_sample, or use a smaller IVF nlist or codec in "
                              "c10.toml") from None
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
        """One shard's rows as an encoding (raw records: ids, descriptor hash, coarse error,
        standalone code) and how many rows FAISS encoded: a row whose descriptor is in `previous`
        (the shard's last encoding with this quantizer) keeps its code."""
        desc = np.ascontiguousarray(desc, dtype=np.float32)
        rows = np.zeros(len(desc), self.dtype())
        for name, _ in ID_FIELDS:
            rows[name] = ids[name]
        rows["dhash"] = row_hashes(desc)
        todo = ~self._reuse(rows, previous)
        if todo.any():
            codes = self.index.sa_encode(desc[todo])
            rows["code"][todo] = codes
            rows["err"][todo] = self.coarse_error(desc[todo], self.list_numbers(codes))
        return rows.tobytes(), int(todo.sum())

    @staticmethod
    def _reuse(rows: np.ndarray, previous: np.ndarray | None) -> np.ndarray:
        """Copy code and error from the rows of `previous` with the same descriptor (a code is a
        function of the descriptor and the quantizer); which rows got them."""
        same = np.zeros(len(rows), bool)
        if previous is None or not len(previous) or not len(rows):
            return same
        order = np.argsort(previous["dhash"][:, 0], kind="stable")
        pos = np.minimum(np.searchsorted(previous["dhash"][order, 0], rows["dhash"][:, 0]),
                         len(order) - 1)
        found = previous[order[pos]]
        same = (found["dhash"] == rows["dhash"]).all(axis=1)
        rows["err"][same], rows["code"][same] = found["err"][same], found["code"][same]
        return same

    def read_encoding(self, data: bytes) -> np.ndarray:
        """An encoding's rows: raw records of self.dtype() (no header to parse: a build reads
        thousands; the key names the quantizer and IVF_SCHEMA the layout)."""
        if len(data) % self.dtype().itemsize:
            raise ValueError(f"{len(data)} bytes is no whole number of {self.dtype()} rows")
        return np.frombuffer(data, self.dtype())

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
        order = canonical_order(rows)
        index = faiss.deserialize_index(np.frombuffer(self.data, np.uint8))
        index.add_sa_codes(rows["code"][order], np.arange(len(rows), dtype="int64"))
        faiss.extract_index_ivf(index).nprobe = nprobe
        ids = np.zeros(len(rows), IDS_DTYPE)
        for name in IDS_DTYPE.names:
            ids[name] = rows[name][order]
        return (faiss.serialize_index(index).tobytes(), ids,
                float(rows["err"].mean(dtype=np.float64)))

    def drift(self, mean_error: float) -> float:
        """Mean coarse error of the indexed rows over that of the training sample."""
        base = self.meta.get("coarse_error") or 0.0
        return mean_error / base if base > 0 else 1.0

    def stale(self, params: Index, dim: int) -> str | None:
        """Why this quantizer must be retrained for these parameters, or None."""
        key = train_key(params, dim)
        diff = sorted(k for k, v in key.items() if self.meta.get(k) != v)
        return f"{', '.join(diff)} changed" if diff else None


def canonical_order(rows: np.ndarray) -> np.ndarray:
    """The permutation sorting rows by (z, x, y): one uint64 key (x, y < 2^28 even at zoom 24 in
    quarter tiles), else a lexsort."""
    if len(rows) and max(int(rows["x"].max()), int(rows["y"].max())) >= 1 << 28:
        return np.lexsort((rows["y"], rows["x"], rows["z"]))
    key = (rows["z"].astype(np.uint64) << np.uint64(56)) | (
        rows["x"].astype(np.uint64) << np.uint64(28)) | rows["y"].astype(np.uint64)
    return np.argsort(key, kind="stable")


# Two fixed odd 64-bit multipliers per 32-bit word of a 256-float descriptor, and more on demand.
_MULTIPLIERS: dict[int, np.ndarray] = {}


def row_hashes(desc: np.ndarray) -> np.ndarray:
    """A 128-bit multilinear hash of each descriptor's bytes (a universal family, vectorized; not
    cryptographic: the shard bytes it reads are already trusted, and a collision only reuses a
    code within one shard's last encoding)."""
    words = np.ascontiguousarray(desc, dtype=np.float32).view("<u4").astype(np.uint64)
    width = words.shape[1] if words.ndim == 2 else 0
    if width not in _MULTIPLIERS:
        rng = np.random.default_rng(0x1F5)
        _MULTIPLIERS[width] = rng.integers(0, 2**63, (width, 2), dtype=np.uint64) * 2 + 1
    m = _MULTIPLIERS[width]
    with np.errstate(over="ignore"):
        return np.stack([(words * m[:, 0]).sum(axis=1, dtype=np.uint64),
                         (words * m[:, 1]).sum(axis=1, dtype=np.uint64)], axis=1)
