"""Local-feature shards: keypoints, descriptors and scores of one block of tiles, incremental per tile."""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Sequence

import numpy as np

from c10 import refs
from c10.errors import DescriptorBatchError
from c10.paths import ref_relpath
from c10.pools import worker_pool
from c10.preprocess import Preprocessing, load_tensor
from c10.shards import ShardStats, TileRecord, embed_workers, tile_rows

OUTPUTS = ("keypoints", "descriptors", "scores")


@dataclass(frozen=True)
class Features:
    """Local features of N images: keypoints [N, K, 2] (x, y pixels of the model input),
    descriptors [N, K, D], scores [N, K]."""

    keypoints: np.ndarray
    descriptors: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.keypoints)

    def __getitem__(self, i) -> "Features":
        return Features(self.keypoints[i], self.descriptors[i], self.scores[i])


Extractor = Callable[[Sequence[Path]], Features]


def features_dtype(keypoints: int, dim: int) -> np.dtype:
    # `ident` is a prefix of the extraction identity (engine key + preprocessing), as in shards.py.
    return np.dtype([("z", "<u1"), ("x", "<u4"), ("y", "<u4"), ("size", "<u8"),
                     ("blake3", "u1", (32,)), ("ident", "u1", (8,)),
                     ("keypoints", "<f4", (keypoints, 2)), ("descriptors", "<f4", (keypoints, dim)),
                     ("scores", "<f4", (keypoints,))])


def run_local(runner, batch: np.ndarray) -> Features:
    """One image [1, 3, H, W] through a local-feature engine, outputs taken by name."""
    out = dict(zip(runner.output_names, runner.run({runner.input_names[0]: batch})))
    missing = [name for name in OUTPUTS if name not in out]
    if missing:
        raise DescriptorBatchError(f"the local-feature engine has outputs {runner.output_names}, not "
                                   f"{list(OUTPUTS)}; export it with `c10 export-models CACHE`")
    return Features(*(np.asarray(out[name], np.float32) for name in OUTPUTS))


def extract_tiles(runner, paths: Sequence[Path], prep: Preprocessing, workers: int | None = None) -> Features:
    """Local features of `paths`, one image per call: each worker decodes a tile and runs it on
    one of the engine's streams (as embed_tiles does with batches), results in order."""
    if not paths:
        return Features(*(np.zeros((0,), np.float32) for _ in OUTPUTS))
    parts = list(worker_pool("local", workers or embed_workers(runner)).map(lambda p: run_local(runner, load_tensor(p, prep)[None]), paths))
    return Features(*(np.concatenate([getattr(f, n) for f in parts]) for n in OUTPUTS))


def pack_features(records: Sequence[TileRecord], feats: Features, ident: str) -> bytes:
    """The shard file's bytes: .npy of rows in canonical (z, x, y) order."""
    _, k, d = feats.descriptors.shape
    rows = tile_rows(records, features_dtype(k, d), ident)
    for name in OUTPUTS:
        rows[name] = getattr(feats, name)
    buf = io.BytesIO()
    np.save(buf, rows, allow_pickle=False)
    return buf.getvalue()


def build_local_shard(root: Path, logical: str, records: Sequence[TileRecord], extract: Extractor,
                      ident: str) -> ShardStats:
    """Write one local-feature shard under its content name, extracting only tiles the build's
    current shard of `logical` lacks for this identity."""
    previous = _previous_rows(refs.reusable_bytes(root, logical), bytes.fromhex(ident)[:8])
    rows = [previous.get((r.tile.id, r.blake3)) for r in records]
    todo = [i for i, row in enumerate(rows) if row is None]
    fresh = extract([Path(root) / records[i].tile.path for i in todo]) if todo else None
    for j, i in enumerate(todo):
        rows[i] = fresh[j]
    shapes = {(f.keypoints.shape, f.descriptors.shape) for f in rows}
    if len(shapes) != 1:
        raise DescriptorBatchError(f"{logical}: the engine's keypoint count or descriptor size differs from "
                                   f"the previous shard's; remove its ref (`rm {ref_relpath(logical)}`), then run "
                                   "`doit build_cache`")
    feats = Features(*(np.stack([getattr(f, n) for f in rows]) for n in OUTPUTS))
    if not all(np.all(np.isfinite(getattr(feats, n))) for n in OUTPUTS):
        raise DescriptorBatchError(f"{logical}: the local-feature engine produced NaN/inf; "
                                   "check the model, then run `doit build_cache` again")
    entry = refs.publish(root, logical, pack_features(records, feats, ident))
    return ShardStats(len(records), len(todo), len(records) - len(todo), entry)


def read_features(path: str | Path | BinaryIO) -> np.ndarray:
    """A local-feature shard's structured rows (no pickle)."""
    return np.load(path, allow_pickle=False)


def _previous_rows(data: bytes | None, tag: bytes) -> dict:
    """(tile id, blake3) -> Features of one tile in an existing shard of the same identity."""
    if data is None:
        return {}
    try:
        rows = read_features(io.BytesIO(data))
    except (OSError, ValueError, EOFError):
        return {}
    if rows.dtype.names is None or not {"ident", "blake3", *OUTPUTS} <= set(rows.dtype.names):
        return {}
    out = {}
    for r in rows[(rows["ident"] == np.frombuffer(tag, np.uint8)).all(axis=1)]:
        key = ((int(r["z"]), int(r["x"]), int(r["y"])), r["blake3"].tobytes().hex())
        out[key] = Features(r["keypoints"], r["descriptors"], r["scores"])
    return out


def tile_features(shard_paths: Iterable[Path], tiles: Iterable[tuple[int, int, int]]) -> dict:
    """(z, x, y) -> Features of one tile, read from the shards that hold them."""
    wanted = {tuple(t) for t in tiles}
    found = {}
    for path in shard_paths:
        for r in read_features(path):
            tid = (int(r["z"]), int(r["x"]), int(r["y"]))
            if tid in wanted:
                found[tid] = Features(r["keypoints"], r["descriptors"], r["scores"])
    return found
