"""Descriptor shards: one block of tiles embedded, with tile ids, sizes and hashes, byte-deterministic."""
from __future__ import annotations

import io
import itertools
import os
import sys
import threading
import time
from concurrent.futures import wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Sequence

import numpy as np

from c10 import refs
from c10.errors import DescriptorBatchError
from c10.paths import ref_relpath
from c10.pools import worker_pool
from c10.preprocess import Preprocessing, load_tensor
from c10.tiles import Tile

# Embedding workers when the engine has one stream (a GPU): each decodes whole batches, so
# several decode while the engine runs another's batch. Pillow, simplejpeg and numpy drop the GIL.
DECODE_THREADS = min(4, os.cpu_count() or 1)


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
    entry: dict | None = None  # the written file: path (content-named), size, blake3


Embedder = Callable[[Sequence[Path]], np.ndarray]
Runner = Callable[[np.ndarray], np.ndarray]


def embed_tiles(runner: Runner, paths: Sequence[Path], prep: Preprocessing, batch_size: int = 32,
                workers: int | None = None, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """L2-normalised descriptors of `paths`, in order. Each worker takes a whole batch, decodes it
    into its own buffer and runs it on one of the engine's streams: every core is always either
    decoding or inferring, and no engine thread waits for a decoder on its core."""
    n = len(paths)
    if not n:
        return np.zeros((0, 0), np.float32)
    workers = workers or embed_workers(runner)
    size = _batch(n, batch_size, workers)
    run = getattr(runner, "stream", runner)
    bounds = list(itertools.accumulate(_staggered(n, size, workers), initial=0))
    futures = [worker_pool("embed", workers).submit(_embed_batch, run, paths[i:j], prep, size)
               for i, j in zip(bounds[:-1], bounds[1:])]
    out = []
    try:
        for future in futures:  # in order: the first failing tile's DescriptorBatchError is raised
            out.append(future.result())
            if progress is not None:
                progress(len(out[-1]))
    finally:
        for future in futures:  # a tile or the engine failed: do not decode batches nobody reads
            future.cancel()
        wait(futures)
    return l2_normalize(np.concatenate(out))


def embed_workers(runner) -> int:
    """One worker per engine stream, and at least DECODE_THREADS to keep a one-stream engine fed."""
    return max(getattr(runner, "streams", 1), DECODE_THREADS)


def _batch(n: int, batch_size: int, workers: int) -> int:
    """The batch size that splits `n` tiles into a multiple of `workers` batches of at most
    `batch_size`: the workers finish together instead of one running the last batch alone."""
    batches = -(-n // batch_size)
    batches = min(n, -(-batches // workers) * workers)
    return -(-n // batches)


def _staggered(n: int, size: int, workers: int) -> list[int]:
    """Batch sizes (at most `size`) that start the workers a 1/workers batch apart and end them
    together: [size/2, size, ..., size, size/2] for two. In step, all would decode at once and
    then all infer; staggered, one decodes while the others infer, which costs less CPU (measured
    on 2 cores: a tile decodes in 0.65 ms beside another decoder, 0.55 ms beside inference;
    embedding rose from 0.831 to 0.846 of the raw engine's rate with ONNX Runtime fp32 and from
    0.585 to 0.615 with OpenVINO bf16, medians of interleaved rounds)."""
    plain = [min(size, n - i) for i in range(0, n, size)]
    if workers < 2 or size < workers or len(plain) < 2 * workers:
        return plain
    head = [size * (k + 1) // workers for k in range(workers - 1)]
    middle, batches = n - size * (workers - 1), len(plain) - (workers - 1)  # head + tail: workers - 1 batches
    even = [middle // batches + (i < middle % batches) for i in range(batches)]
    return [*head, *even, *(size - h for h in head)]


_BUFFERS = threading.local()


def _embed_batch(run: Runner, paths: Sequence[Path], prep: Preprocessing, size: int) -> np.ndarray:
    """One batch decoded into this worker's buffer (reused: fresh pages cost as much as a resize), then run."""
    shape = (size, *prep.shape)
    if getattr(_BUFFERS, "shape", None) != shape:
        _BUFFERS.shape, _BUFFERS.array = shape, np.empty(shape, np.float32)
    batch = _BUFFERS.array[:len(paths)]
    for j, path in enumerate(paths):
        load_tensor(path, prep, batch[j])
    return np.array(run(batch), dtype=np.float32).reshape(len(paths), -1)  # a copy: the buffer is reused


def l2_normalize(desc: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(desc, axis=1, keepdims=True)
    return (desc / np.maximum(norms, 1e-12)).astype(np.float32)


def read_shard(path: str | Path | BinaryIO) -> np.ndarray:
    """A shard's structured rows (no pickle)."""
    return np.load(path, allow_pickle=False)


def tile_rows(records: Sequence[TileRecord], dtype: np.dtype, ident: str) -> np.ndarray:
    """Rows of `dtype` with every shard's common columns filled: z, x, y, size, blake3, ident."""
    rows = np.zeros(len(records), dtype)
    rows["z"] = [r.tile.z for r in records]
    rows["x"] = [r.tile.x for r in records]
    rows["y"] = [r.tile.y for r in records]
    rows["size"] = [r.size for r in records]
    rows["blake3"] = np.frombuffer(bytes.fromhex("".join(r.blake3 for r in records)), np.uint8).reshape(-1, 32)
    rows["ident"] = np.frombuffer(bytes.fromhex(ident)[:8], np.uint8)
    return rows


def pack_shard(records: Sequence[TileRecord], desc: np.ndarray, ident: str) -> bytes:
    """The shard file's bytes: .npy of rows in canonical (z, x, y) order."""
    rows = tile_rows(records, shard_dtype(desc.shape[1]), ident)
    rows["desc"] = desc
    buf = io.BytesIO()
    np.save(buf, rows, allow_pickle=False)
    return buf.getvalue()


def build_shard(root: Path, logical: str, records: Sequence[TileRecord], embed: Embedder,
                ident: str) -> ShardStats:
    """Write one shard under its content name, embedding only tiles that the build's current
    shard of `logical` lacks for this identity; stats.entry names the new file (for its ref)."""
    previous = _previous_rows(refs.reusable_bytes(root, logical), bytes.fromhex(ident)[:8])
    reuse = [previous.get((r.tile.id, r.blake3)) for r in records]
    todo = [i for i, vec in enumerate(reuse) if vec is None]
    fresh = embed([root / records[i].tile.path for i in todo]) if todo else None
    for j, i in enumerate(todo):
        reuse[i] = fresh[j]
    if len({len(v) for v in reuse}) != 1:
        raise DescriptorBatchError(f"{logical}: the engine's descriptor size differs from the previous "
                                   f"shard's; remove its ref (`rm {ref_relpath(logical)}`), then run `doit build_cache`")
    desc = np.stack(reuse).astype(np.float32)
    if not np.all(np.isfinite(desc)):
        raise DescriptorBatchError(f"{logical}: the engine produced NaN/inf descriptors; "
                                   "check the model, then run `doit build_cache` again")
    entry = refs.publish(root, logical, pack_shard(records, desc, ident))
    return ShardStats(len(records), len(todo), len(records) - len(todo), entry)


def _previous_rows(data: bytes | None, tag: bytes) -> dict:
    """(tile id, blake3) -> descriptor of an existing shard of the same identity; empty if none."""
    if data is None:
        return {}
    try:
        rows = read_shard(io.BytesIO(data))
    except (OSError, ValueError, EOFError):
        return {}
    if rows.dtype.names is None or not {"ident", "desc", "blake3"} <= set(rows.dtype.names):
        return {}
    rows = rows[(rows["ident"] == np.frombuffer(tag, np.uint8)).all(axis=1)]
    ids = zip(rows["z"].tolist(), rows["x"].tolist(), rows["y"].tolist())
    digests = rows["blake3"].tobytes().hex()
    return {((z, x, y), digests[64 * i:64 * (i + 1)]): rows["desc"][i] for i, (z, x, y) in enumerate(ids)}


def tile_facts(path: str | Path) -> dict[tuple[int, int, int], tuple[int, str]]:
    """(z, x, y) -> (size, blake3) of the tiles a shard was built from (the Manifest's tile entries)."""
    rows = read_shard(path)
    digests = rows["blake3"].tobytes().hex()
    ids = zip(rows["z"].tolist(), rows["x"].tolist(), rows["y"].tolist(), rows["size"].tolist())
    return {(z, x, y): (size, digests[64 * i:64 * (i + 1)]) for i, (z, x, y, size) in enumerate(ids)}


@contextmanager
def progress_bar(label: str, total: int) -> Iterator[Callable[[int], None]]:
    """advance(n) for a transient tiles/s bar on a terminal's stderr; does nothing otherwise."""
    stream = sys.__stderr__
    if stream is None or not stream.isatty() or os.environ.get("C10_NO_PROGRESS"):
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    started = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]:.0f} tiles/s"), TimeElapsedColumn(),
                  console=Console(file=stream), transient=True,
                  redirect_stdout=False, redirect_stderr=False) as bar:
        task = bar.add_task(label, total=total, rate=0.0)

        def advance(n: int) -> None:
            done = bar.tasks[0].completed + n
            bar.update(task, advance=n, rate=done / max(time.perf_counter() - started, 1e-6))

        yield advance
