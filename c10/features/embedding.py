"""Tiles through an engine: batched descriptors and local features, every core busy."""
from __future__ import annotations

import itertools
import os
import sys
import threading
import time
from concurrent.futures import wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from c10.errors import DescriptorBatchError
from c10.features.pools import worker_pool
from c10.features.preprocess import Preprocessing, load_tensor

OUTPUTS = ("keypoints", "descriptors", "scores")  # a local-feature engine's outputs, by name
# Embedding workers when the engine has one stream (a GPU): each decodes whole batches, so
# several decode while the engine runs another's batch. Pillow, simplejpeg and numpy drop the GIL.
DECODE_THREADS = min(4, os.cpu_count() or 1)


def embed_tiles(runner, paths: Sequence[Path], prep: Preprocessing, batch_size: int = 32,
                workers: int | None = None,
                progress: Callable[[int], None] | None = None,
                load: Callable = load_tensor) -> np.ndarray:
    """L2-normalised descriptors of `paths`, in order. Each worker takes a whole batch, decodes it
    into its own buffer and runs it on one of the engine's streams: every core is always either
    decoding or inferring, and no engine thread waits for a decoder on its core.

    load(item, prep, out) fills one tensor (default: decode a tile file; windows cut a mosaic)."""
    n = len(paths)
    if not n:
        return np.zeros((0, 0), np.float32)
    workers = workers or embed_workers(runner)
    size = _batch(n, batch_size, workers)
    run = getattr(runner, "stream", runner)
    bounds = list(itertools.accumulate(_staggered(n, size, workers), initial=0))
    futures = [worker_pool("embed", workers).submit(_embed_batch, run, paths[i:j], prep, size,
                                                       load)
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
    then all infer; staggered, one decodes while the others infer, which costs less CPU (measured:
    a tile decodes faster beside inference than beside another decoder, and embedding came closer
    to the raw engine's rate with ONNX Runtime fp32 and with OpenVINO bf16; figures in
    docs/figures.md)."""
    plain = [min(size, n - i) for i in range(0, n, size)]
    if workers < 2 or size < workers or len(plain) < 2 * workers:
        return plain
    head = [size * (k + 1) // workers for k in range(workers - 1)]
    # head + tail: workers - 1 batches
    middle, batches = n - size * (workers - 1), len(plain) - (workers - 1)
    even = [middle // batches + (i < middle % batches) for i in range(batches)]
    return [*head, *even, *(size - h for h in head)]


_BUFFERS = threading.local()


def _embed_batch(run: Callable[[np.ndarray], np.ndarray], paths: Sequence[Path],
                 prep: Preprocessing, size: int, load: Callable = load_tensor) -> np.ndarray:
    """One batch decoded into this worker's buffer (reused: fresh pages cost as much as a resize),
    then run."""
    shape = (size, *prep.shape)
    if getattr(_BUFFERS, "shape", None) != shape:
        _BUFFERS.shape, _BUFFERS.array = shape, np.empty(shape, np.float32)
    batch = _BUFFERS.array[:len(paths)]
    for j, path in enumerate(paths):
        load(path, prep, batch[j])
    with inference(paths):
        out = run(batch)
    # a copy: the buffer is reused
    return np.array(out, dtype=np.float32).reshape(len(paths), -1)


@contextmanager
def inference(paths: Sequence[Path]) -> Iterator[None]:
    """An engine's runtime failure on these tiles (onnxruntime's RuntimeError, an OpenVINO
    exception, TensorRT's execution or CUDA error, out of memory) as the seed's
    DescriptorBatchError (CP-TC-9), naming the tiles; a DescriptorBatchError passes unchanged."""
    try:
        yield
    except DescriptorBatchError:
        raise
    except Exception as exc:
        first, last = paths[0], paths[-1]  # tile paths, or windows (their own str)
        tiles = f"{first}" if len(paths) == 1 else f"{len(paths)} tiles {first} .. {last}"
        raise DescriptorBatchError(
            f"the engine failed on {tiles}: {type(exc).__name__}: {exc}",
            "if the device ran out of memory, lower the model's batch_size in c10.toml") from exc


def l2_normalize(desc: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(desc, axis=1, keepdims=True)
    return (desc / np.maximum(norms, 1e-12)).astype(np.float32)


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

    def columns(self) -> tuple[np.ndarray, ...]:
        """The arrays in OUTPUTS order: the value columns of a local-feature shard."""
        return self.keypoints, self.descriptors, self.scores


def run_local(runner, batch: np.ndarray, where: str | Path = "an image") -> Features:
    """One image [1, 3, H, W] through a local-feature engine, outputs taken by name."""
    with inference([where]):
        out = dict(zip(runner.output_names, runner.run({runner.input_names[0]: batch})))
    missing = [name for name in OUTPUTS if name not in out]
    if missing:
        raise DescriptorBatchError(f"the local-feature engine has outputs {runner.output_names}, "
                                   f"not {list(OUTPUTS)}",
                                   fix="export it with `c10 export-models CACHE`")
    return Features(*(np.asarray(out[name], np.float32) for name in OUTPUTS))


def extract_tiles(runner, paths: Sequence[Path], prep: Preprocessing,
                  workers: int | None = None) -> Features:
    """Local features of `paths`, one image per call: each worker decodes a tile and runs it on
    one of the engine's streams (as embed_tiles does with batches), results in order."""
    if not paths:
        return Features(*(np.zeros((0,), np.float32) for _ in OUTPUTS))
    pool = worker_pool("local", workers or embed_workers(runner))
    parts = list(pool.map(lambda p: run_local(runner, load_tensor(p, prep)[None], p), paths))
    return Features(*(np.concatenate([getattr(f, n) for f in parts]) for n in OUTPUTS))


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
