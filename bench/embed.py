"""Embedding throughput: tiles/s of the real shard action vs the same engine's images/s on pre-made
tensors, interleaved in one run; prints JSON.
Run as `env -u PYTHONDONTWRITEBYTECODE python bench/embed.py`."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mercantile
import numpy as np

from c10.tools import demo, netgen, synth
from c10.tools.project import init_cache
from c10.trust.keys import generate_key


def block_bbox(blocks: int, block: int, z: int = 16) -> tuple[float, float, float, float]:
    """A bbox of exactly `blocks` full blocks near Kyiv: every shard holds block x block tiles,
    so the stage is measured on full batches, as in the bulk of a large cache."""
    centre = mercantile.tile(demo.CENTER[1], demo.CENTER[0], z)
    x0, y0 = centre.x // block * block, centre.y // block * block
    west, north = mercantile.ul(x0, y0, z)
    east, south = mercantile.ul(x0 + block * blocks, y0 + block, z)
    return (south + 1e-7, west + 1e-7, north - 1e-7, east - 1e-7)


def make_cache(root: Path, tiles: int, backend: str, key: Path, input_size: int, block: int,
               precision: str = "fp32", tile_size: int = 256, decode: str = "full") -> None:
    """A cache of ~`tiles` demo-like `tile_size` px JPEG tiles in full blocks at one zoom, the
    demo's global model (models.global.decode = `decode`)."""
    root.mkdir(parents=True)
    bbox = block_bbox(max(1, round(tiles / block ** 2)), block)
    synth.make_tiles(root / "tiles", bbox, (16,), size=tile_size)
    netgen.write_global_model(root / "models" / "global.onnx", input_size=input_size)
    init_cache(root, bbox=str(list(bbox)), zooms="[16]", backend=backend, size=input_size,
               key=str(key))
    text = (root / "c10.toml").read_text()
    text = text.split("[models.local]")[0] + "[shards]" + text.split("[shards]")[1]
    if 'precision = "fp32"' not in text:
        raise SystemExit("bench/embed.py: c10 init's template no longer sets precision = \"fp32\"")
    text = text.replace('precision = "fp32"', f'precision = "{precision}"\ndecode = "{decode}"', 1)
    (root / "c10.toml").write_text(text.replace("block = 16", f"block = {block}"))


def engine_rate(runner, images: int, batch: int, shape: tuple) -> tuple[float, float]:
    """(images/s, CPU ms per image) of the loaded engine on pre-made batches, `images` images in
    all, run the faster of two ways: one call after another (each split over the engine's
    streams), or one thread per stream each calling it with whole batches (what the embedding
    workers do)."""
    data = np.random.default_rng(0).standard_normal((batch, *shape), dtype=np.float32)
    sizes = [min(batch, images - done) for done in range(0, images, batch)]
    calls = _timed(lambda: [runner(data[:n]) for n in sizes], images)
    with ThreadPoolExecutor(runner.streams) as pool:
        streams = _timed(lambda: list(pool.map(lambda n: runner.stream(data[:n]), sizes)), images)
    return max(calls, streams)


def _timed(work, images: int) -> tuple[float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    work()
    return images / (time.perf_counter() - start), (time.process_time() - cpu) / images * 1e3


def shard_rate(root: Path, name: str) -> tuple[float, float, int]:
    """(tiles/s, CPU ms per tile, tiles) of every shard action of `name`, from no shards and no hash
    cache (a cold stage: hashing, decoding, inference, packing and the atomic writes)."""
    from c10.rules import session
    from c10.rules.shards import build_shard
    from c10.store.hashcache import HashCache
    from c10.store.layout import TILE_HASHES_DIR, ref_relpath

    build = session.begin(root)  # this thread's running build: its plan, engines and lock
    plan = build.plan()
    shards = plan.plans[name].shards
    for rel in shards:
        (root / ref_relpath(rel)).unlink(missing_ok=True)
    # without the shard files no row is reused (c10.features.descriptor_store finds rows in every
    # shard the build trusts, the ones an earlier round wrote included)
    shutil.rmtree(root / "shards", ignore_errors=True)
    shutil.rmtree(root / TILE_HASHES_DIR, ignore_errors=True)
    build.hashes = HashCache(build.root)  # forget the hashes in memory too: every tile is re-hashed
    start, cpu = time.perf_counter(), time.process_time()
    embedded = sum(build_shard(name, rel)["embedded"] for rel in shards)
    if embedded != len(plan.tiles):
        raise SystemExit(f"bench/embed.py: {embedded} of {len(plan.tiles)} tiles embedded; "
                         "the shard stage reused rows, so its rate would be meaningless")
    seconds, cpu_s = time.perf_counter() - start, time.process_time() - cpu
    return embedded / seconds, cpu_s / embedded * 1e3, embedded


def pipeline_rate(runner, paths: list[Path], prep, batch: int) -> tuple[float, float]:
    """(tiles/s, CPU ms per tile) of c10.features.embedding.embed_tiles alone: decoding overlapped
    with inference."""
    from c10.features.embedding import embed_tiles

    start, cpu = time.perf_counter(), time.process_time()
    embed_tiles(runner, paths, prep, batch)
    seconds, cpu_s = time.perf_counter() - start, time.process_time() - cpu
    return len(paths) / seconds, cpu_s / len(paths) * 1e3


def preprocess_cost(root: Path, prep, count: int = 64) -> tuple[float, float]:
    """Single-thread CPU ms per tile of (read + decode + resize + normalise, read + decode alone):
    what the decode threads add, and the part of it no resize can save."""
    from c10.features.preprocess import decode, load_tensor

    paths = sorted((root / "tiles").rglob("*.jpg"))[:count]
    out = np.empty(prep.shape, np.float32)
    start = time.thread_time()  # CPU time: a busy host does not inflate it
    for path in paths:
        load_tensor(path, prep, out)
    mid = time.thread_time()
    for path in paths:
        decode(path, prep)
    return (mid - start) / len(paths) * 1e3, (time.thread_time() - mid) / len(paths) * 1e3


@contextlib.contextmanager
def free_resize():
    """--what-if free-resize: the resize replaced by a crop to the input size (still normalised), so
    the run shows the rate a zero-cost resize would reach. Its descriptors are wrong; only rates
    count."""
    import c10.features.preprocess as preprocess

    def crop(pixels, prep, out):  # at the input size to_tensor only normalises
        h, w = prep.input_size
        return preprocess.to_tensor(pixels[:h, :w], prep, out)

    real, preprocess._resample = preprocess._resample, crop
    try:
        yield
    finally:
        preprocess._resample = real


def bench_backend(workdir: Path, backend: str, args) -> dict:
    from c10.features.preprocess import Preprocessing
    from c10.rules import session
    from c10.rules.driver import run_build

    root = workdir / f"cache-{backend}"
    # ONNX Runtime's engine is fp32 or int8 (calibrated on the cache's tiles)
    precision = args.precision if backend == "openvino" or args.precision == "int8" else "fp32"
    make_cache(root, args.tiles, backend, workdir / "key.pem", args.input, args.block, precision,
               args.tile_size, args.decode)
    os.environ["C10_NO_PROGRESS"] = "1"
    with contextlib.redirect_stdout(sys.stderr):  # doit's progress lines: keep stdout pure JSON
        built = run_build(root, ["engines"])
    if built != 0:
        raise SystemExit(f"engine build failed for {backend}")
    before = os.getcwd()
    os.chdir(root)
    try:
        build = session.begin(root)
        cache_plan = build.plan()
        plan = cache_plan.plans["global"]
        t0 = time.perf_counter()
        runner = build.runner(plan)
        load_s = time.perf_counter() - t0
        prep = Preprocessing.from_model(plan.model)
        # Warm-up, discarded: the workers' threads and batch buffers and the engine's memory arena
        # are set up once per build process, not per shard.
        engine_rate(runner, 2 * plan.model.batch_size * runner.streams, plan.model.batch_size,
                    prep.shape)
        shard_rate(root, "global")
        engine, shard, pipeline = [], [], []
        paths = [root / t.path for t in cache_plan.tiles]
        with free_resize() if args.what_if == "free-resize" else contextlib.nullcontext():
            for _ in range(args.rounds):  # interleaved: a busy neighbour slows both alike
                *rate, tiles = shard_rate(root, "global")
                shard.append(rate)
                engine.append(engine_rate(runner, tiles, plan.model.batch_size, prep.shape))
                pipeline.append(pipeline_rate(runner, paths, prep, plan.model.batch_size))
            pre_ms, decode_ms = preprocess_cost(root, prep)
    finally:
        session.end()
        os.chdir(before)
    e, s = (statistics.median(r[0] for r in rs) for rs in (engine, shard))
    e_cpu, s_cpu = (statistics.median(r[1] for r in rs) for rs in (engine, shard))
    p, p_cpu = (statistics.median(r[i] for r in pipeline) for i in (0, 1))
    return {"backend": plan.backend.name, "precision": precision, "what_if": args.what_if,
            "tiles": tiles, "tile_size": args.tile_size, "decode": prep.decode,
            "batch": plan.model.batch_size,
            "input": args.input, "engine_load_s": round(load_s, 3), "streams": runner.streams,
            "engine_images_per_s": round(e, 1), "shard_tiles_per_s": round(s, 1),
            "ratio": round(s / e, 3),
            "median_paired_ratio": round(
                statistics.median(sr[0] / er[0] for sr, er in zip(shard, engine)), 3),
            "paired_ratios": [round(sr[0] / er[0], 3) for sr, er in zip(shard, engine)],
            "embed_tiles_only_per_s": round(p, 1), "embed_tiles_only_ratio": round(p / e, 3),
            "engine_cpu_ms_per_image": round(e_cpu, 2), "shard_cpu_ms_per_tile": round(s_cpu, 2),
            "embed_tiles_only_cpu_ms_per_tile": round(p_cpu, 2),
            "cpu_ratio": round(e_cpu / s_cpu, 3),
            "rounds_engine": [round(r[0], 1) for r in engine],
            "rounds_shard": [round(r[0], 1) for r in shard],
            "preprocess_ms_per_tile_1_thread": round(pre_ms, 3),
            # The best ratio any overlap can reach when decoding takes its CPU from the engine's
            # cores (a CPU engine on every core): the engine's CPU per image over that plus a
            # tile's decode + preprocessing, both measured in this run.
            "cpu_ceiling_ratio": round(e_cpu / (e_cpu + pre_ms), 3),
            "decode_ms_per_tile_1_thread": round(decode_ms, 3),
            # The same with a resize and normalisation that cost nothing: read + decode alone.
            "decode_only_ceiling_ratio": round(e_cpu / (e_cpu + decode_ms), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiles", type=int, default=512)
    parser.add_argument("--input", type=int, default=224)
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--tile-size", type=int, default=256, help="tile side in pixels")
    parser.add_argument("--decode", choices=("full", "scaled"), default="full",
                        help="models.global.decode: scaled decodes JPEGs of >= 2x the input at "
                             "1/2, 1/4 or 1/8 in libjpeg-turbo")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backends", default="onnxruntime,openvino")
    parser.add_argument("--precision", default="fp32",
                        help="OpenVINO's models.global.precision (bf16: AMX hosts); int8: "
                             "ONNX Runtime's too")
    parser.add_argument("--what-if", choices=("free-resize",), default=None,
                        help="free-resize: crop instead of resizing, to measure what a zero-cost "
                             "resize would reach")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="c10-bench-embed-") as tmp:
        workdir = Path(tmp)
        generate_key(workdir / "key.pem")
        results = [bench_backend(workdir, b, args) for b in args.backends.split(",")]
    print(json.dumps({"bench": "embed", "cpus": os.cpu_count(),
                      "loadavg": [round(v, 2) for v in os.getloadavg()],
                      "python": sys.version.split()[0], "results": results}, indent=2))


if __name__ == "__main__":
    main()
