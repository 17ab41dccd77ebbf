"""Descriptor shards: one block of tiles embedded, with tile ids, sizes and hashes, byte-deterministic."""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from c10 import atomic
from c10.errors import DescriptorBatchError
from c10.preprocess import Preprocessing, load_tensor
from c10.tiles import Tile

def shard_dtype(dim: int) -> np.dtype:
    # `ident` is a prefix of the embedding identity (engine key + preprocessing): rows of
    # another identity are never reused when a block is re-embedded incrementally.
    return np.dtype([("z", "<u1"), ("x", "<u4"), ("y", "<u4"), ("size", "<u8"),
                     ("blake3", "u1", (32,)), ("ident", "u1", (8,)), ("desc", "<f4", (dim,))])


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


Embedder = Callable[[Sequence[Path]], np.ndarray]


def embed_tiles(runner: Callable[[np.ndarray], np.ndarray], paths: Sequence[Path], prep: Preprocessing,
                batch_size: int = 32, threads: int = 2) -> np.ndarray:
    """Descriptors of `paths`: decoding of batch i+1 overlaps inference of batch i."""
    batches = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    if not batches:
        return np.zeros((0, 0), np.float32)
    out = []
    with ThreadPoolExecutor(threads) as pool:
        pending = _submit(pool, batches[0], prep)
        for nxt in batches[1:] + [None]:
            tensors = [f.result() for f in pending]
            pending = _submit(pool, nxt, prep) if nxt is not None else []
            out.append(np.asarray(runner(np.stack(tensors)), dtype=np.float32))
    return l2_normalize(np.concatenate(out))


def _submit(pool: ThreadPoolExecutor, batch, prep):
    return [pool.submit(load_tensor, p, prep) for p in batch]


def l2_normalize(desc: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(desc, axis=1, keepdims=True)
    return (desc / np.maximum(norms, 1e-12)).astype(np.float32)


def read_shard(path: str | Path) -> np.ndarray:
    """A shard's structured rows (no pickle)."""
    return np.load(path, allow_pickle=False)


def pack_shard(records: Sequence[TileRecord], desc: np.ndarray, ident: str) -> bytes:
    """The shard file's bytes: .npy of rows in canonical (z, x, y) order."""
    rows = np.zeros(len(records), shard_dtype(desc.shape[1]))
    tag = bytes.fromhex(ident)[:8]
    for i, rec in enumerate(records):
        rows[i] = (rec.tile.z, rec.tile.x, rec.tile.y, rec.size,
                   np.frombuffer(bytes.fromhex(rec.blake3), np.uint8), np.frombuffer(tag, np.uint8), desc[i])
    buf = io.BytesIO()
    np.save(buf, rows, allow_pickle=False)
    return buf.getvalue()


def build_shard(root: Path, out_rel: str, records: Sequence[TileRecord], embed: Embedder,
                ident: str) -> ShardStats:
    """Write one shard, embedding only tiles that the previous shard lacks for this identity."""
    previous = _previous_rows(root / out_rel, bytes.fromhex(ident)[:8])
    reuse = [previous.get((r.tile.id, r.blake3)) for r in records]
    todo = [i for i, vec in enumerate(reuse) if vec is None]
    fresh = embed([root / records[i].tile.path for i in todo]) if todo else None
    for j, i in enumerate(todo):
        reuse[i] = fresh[j]
    desc = np.stack(reuse).astype(np.float32)
    if not np.all(np.isfinite(desc)):
        raise DescriptorBatchError(f"{out_rel}: the engine produced NaN/inf descriptors; "
                                   "check the model, then re-run `doit build_cache`")
    atomic.write_bytes(root / out_rel, pack_shard(records, desc, ident))
    return ShardStats(len(records), len(todo), len(records) - len(todo))


def _previous_rows(path: Path, tag: bytes) -> dict:
    """(tile id, blake3) -> descriptor of an existing shard of the same identity; empty if none."""
    try:
        rows = read_shard(path)
    except (OSError, ValueError):
        return {}
    if rows.dtype.names is None or "ident" not in rows.dtype.names:
        return {}
    return {((int(r["z"]), int(r["x"]), int(r["y"])), r["blake3"].tobytes().hex()): r["desc"]
            for r in rows if r["ident"].tobytes() == tag}


def tile_facts(path: str | Path) -> dict[tuple[int, int, int], tuple[int, str]]:
    """(z, x, y) -> (size, blake3) of the tiles a shard was built from (the Manifest's tile entries)."""
    return {(int(r["z"]), int(r["x"]), int(r["y"])): (int(r["size"]), r["blake3"].tobytes().hex())
            for r in read_shard(path)}
