"""Block shards, byte-deterministic: one algorithm, two codecs (descriptors, local features)."""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Sequence

import numpy as np

from c10.errors import DescriptorBatchError
from c10.features.descriptor_store import Reuse
from c10.features.embedding import OUTPUTS, Features
from c10.store import refs
from c10.store.layout import ref_relpath
from c10.store.tiles import Tile

# Columns every shard has; `ident` is a prefix of the embedding identity (engine key +
# preprocessing): rows of another identity are never reused (c10.features.descriptor_store).
BASE_FIELDS = [("z", "<u1"), ("x", "<u4"), ("y", "<u4"), ("size", "<u8"), ("blake3", "u1", (32,)),
               ("ident", "u1", (8,))]


@dataclass(frozen=True)
class Codec:
    """What one kind of shard holds per tile: float32 value columns, named."""

    what: str                   # for messages
    columns: tuple[str, ...]


DESCRIPTORS = Codec("descriptor", ("desc",))
LOCAL_FEATURES = Codec("local features", OUTPUTS)

# compute(tile paths) -> one array per codec column, the tiles along the first axis
Compute = Callable[[Sequence[Path]], Sequence[np.ndarray]]


@dataclass(frozen=True)
class TileRecord:
    tile: Tile
    size: int
    blake3: str


@dataclass(frozen=True)
class ShardStats:
    tiles: int
    embedded: int
    reused: int
    entry: dict | None = None  # the written file: path (content-named), size, blake3


def build_shard(root: Path, logical: str, records: Sequence[TileRecord], compute: Compute,
                ident: str, codec: Codec = DESCRIPTORS, reuse: Reuse | None = None,
                inputs: Callable[[TileRecord], object] | None = None) -> ShardStats:
    """Write one shard under its content name, computing only the tiles `reuse` has no trusted
    row for (c10.features.descriptor_store: by tile bytes and this identity, from any trusted
    shard), each distinct tile content once; stats.entry names the new file (for its ref).

    inputs(record): what compute() gets for a row (default: the tile file's path)."""
    values = list(reuse([(r.tile.id, r.blake3) for r in records])) if reuse else \
        [None] * len(records)
    todo, first = [], {}  # a tile copied under two ids of this block is computed once
    for i, row in enumerate(values):
        if row is None and records[i].blake3 not in first:
            first[records[i].blake3] = len(todo)
            todo.append(i)
    if todo:
        where = inputs or (lambda r: Path(root) / r.tile.path)
        fresh = compute([where(records[i]) for i in todo])
        computed = [tuple(column[j] for column in fresh) for j in range(len(todo))]
        values = [computed[first[r.blake3]] if row is None else row
                  for r, row in zip(records, values)]
    if len({tuple(v.shape for v in row) for row in values}) != 1:
        raise DescriptorBatchError(f"{logical}: the engine's {codec.what} shape differs from the "
                                   "reused rows'",
                                   fix=f"remove its ref (`rm {ref_relpath(logical)}`)")
    columns = [np.stack([row[c] for row in values]).astype(np.float32)
               for c in range(len(codec.columns))]
    if not all(np.all(np.isfinite(column)) for column in columns):
        raise DescriptorBatchError(f"{logical}: the engine produced NaN/inf {codec.what}",
                                   fix="check the model")
    entry = refs.publish(root, logical, pack_shard(records, columns, ident, codec))
    return ShardStats(len(records), len(todo), len(records) - len(todo), entry)


def pack_shard(records: Sequence[TileRecord], columns: Sequence[np.ndarray], ident: str,
               codec: Codec = DESCRIPTORS) -> bytes:
    """The shard file's bytes: .npy of rows in canonical (z, x, y) order (no pickle)."""
    dtype = np.dtype(BASE_FIELDS + [(name, "<f4", col.shape[1:])
                                    for name, col in zip(codec.columns, columns)])
    rows = np.zeros(len(records), dtype)
    rows["z"] = [r.tile.z for r in records]
    rows["x"] = [r.tile.x for r in records]
    rows["y"] = [r.tile.y for r in records]
    rows["size"] = [r.size for r in records]
    rows["blake3"] = np.frombuffer(bytes.fromhex("".join(r.blake3 for r in records)),
                                   np.uint8).reshape(-1, 32)
    rows["ident"] = np.frombuffer(bytes.fromhex(ident)[:8], np.uint8)
    for name, column in zip(codec.columns, columns):
        rows[name] = column
    buf = io.BytesIO()
    np.save(buf, rows, allow_pickle=False)
    return buf.getvalue()


def read_shard(path: str | Path | BinaryIO) -> np.ndarray:
    """A shard's structured rows (no pickle)."""
    return np.load(path, allow_pickle=False)


def tile_facts(path: str | Path) -> dict[tuple[int, int, int], tuple[int, str]]:
    """(z, x, y) -> (size, blake3) of the tiles a shard was built from (the Manifest's tile
    entries)."""
    rows = read_shard(path)
    digests = rows["blake3"].tobytes().hex()
    ids = zip(rows["z"].tolist(), rows["x"].tolist(), rows["y"].tolist(), rows["size"].tolist())
    return {(z, x, y): (size, digests[64 * i:64 * (i + 1)])
            for i, (z, x, y, size) in enumerate(ids)}


def tile_features(shard_paths: Iterable[Path], tiles: Iterable[tuple[int, int, int]]) -> dict:
    """(z, x, y) -> Features of one tile, read from the local-feature shards that hold them."""
    wanted = {tuple(t) for t in tiles}
    found = {}
    for path in shard_paths:
        for r in read_shard(path):
            tid = (int(r["z"]), int(r["x"]), int(r["y"]))
            if tid in wanted:
                found[tid] = Features(*(r[name] for name in OUTPUTS))
    return found
