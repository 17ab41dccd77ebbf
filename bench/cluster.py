"""Embedding stage tiles/s: local vs a Dask LocalCluster of 1 and 2 worker processes, and the
driver's overhead per shard; prints JSON.
Run as `env -u PYTHONDONTWRITEBYTECODE python bench/cluster.py`."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import distributed

from c10.features import cluster
from c10.rules.driver import run_build
from c10.tools import demo, netgen, synth
from c10.tools.project import init_cache
from c10.trust.keys import generate_key

ZOOM = 16


def make_cache(root: Path, tiles: int, backend: str, key: Path, input_size: int, block: int) -> int:
    """~`tiles` demo-like 256 px JPEG tiles at one zoom and the demo's global model; returns the
    count."""
    root.mkdir(parents=True)
    bbox = demo.demo_bbox(tiles, (ZOOM,))
    synth.make_tiles(root / "tiles", bbox, (ZOOM,))
    netgen.write_global_model(root / "models" / "global.onnx", input_size=input_size)
    init_cache(root, bbox=str(list(bbox)), zooms=f"[{ZOOM}]", backend=backend, size=input_size,
               key=str(key))
    text = (root / "c10.toml").read_text()
    text = text.split("[models.local]")[0] + "[shards]" + text.split("[shards]")[1]
    (root / "c10.toml").write_text(text.replace("block = 16", f"block = {block}"))
    return sum(1 for _ in (root / "tiles").rglob("*.jpg"))


def set_executor(root: Path, address: str | None) -> None:
    """c10.toml's [executor]: local, or the cluster at `address` (not part of the request: no
    rebuild)."""
    text = (root / "c10.toml").read_text().split("\n[executor]")[0]
    if address:
        text += f'\n[executor]\nkind = "dask"\nscheduler = "{address}"\ntiles = "bytes"\n'
    (root / "c10.toml").write_text(text)


def shards_stage(root: Path, doit_args: list[str]) -> float:
    """Wall seconds of `doit shards` from no shards (tiles already hashed: only the embedding
    stage)."""
    for shard in (root / "shards").rglob("*.npy"):
        shard.unlink()
    start = time.perf_counter()
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        code = run_build(root, [*doit_args, "shards"])
    if code != 0:
        raise SystemExit(f"shards stage failed ({doit_args})")
    return time.perf_counter() - start


def compute_seconds(stream: list[dict]) -> tuple[float, int]:
    """Seconds the workers spent computing c10 batches, and how many batches."""
    spans = [s for t in stream if str(t["key"]).startswith(cluster.TASK_PREFIX)
             for s in t["startstops"] if s["action"] == "compute"]
    return sum(s["stop"] - s["start"] for s in spans), len(spans)


def driver_overhead(root: Path, client, shards: int) -> dict:
    """One worker, one shard at a time: stage wall minus worker compute, per shard."""
    with distributed.get_task_stream(client=client) as ts:
        wall = shards_stage(root, [])
    busy, batches = compute_seconds(ts.data)
    return {"shards": shards, "batches": batches, "stage_s": round(wall, 3),
            "worker_compute_s": round(busy, 3),
            "driver_overhead_per_shard_ms": round((wall - busy) / shards * 1e3, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiles", type=int, default=1024)
    parser.add_argument("--input", type=int, default=224)
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--inflight", type=int, default=4,
                        help="doit -n with -P thread for the cluster runs")
    parser.add_argument("--backend", default="onnxruntime")
    args = parser.parse_args()
    os.environ["C10_NO_PROGRESS"] = "1"
    with tempfile.TemporaryDirectory(prefix="c10-bench-cluster-") as tmp:
        print(json.dumps(run(Path(tmp), args), indent=2))


def run(work: Path, args) -> dict:
    generate_key(work / "key.pem")
    root = work / "cache"
    tiles = make_cache(root, args.tiles, args.backend, work / "key.pem", args.input, args.block)
    with contextlib.redirect_stdout(sys.stderr):  # stdout is the JSON
        built = run_build(root, ["engines"])
    if built != 0:
        raise SystemExit("engine build failed")
    env = {cluster.WORKER_CACHE_ENV: str(work / "worker-cache"), "C10_NO_PROGRESS": "1"}
    clusters = {n: distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                            memory_limit="2GiB", dashboard_address=None, env=env,
                                            silence_logs=logging.ERROR)
                for n in (1, 2)}
    try:
        threaded = ["-n", str(args.inflight), "-P", "thread"]
        variants = {"local": (None, []),
                    **{f"dask_{n}_workers": (c.scheduler_address, threaded)
                       for n, c in clusters.items()}}
        first = {}
        for name, (address, doit_args) in variants.items():  # warm-up: workers load the engine once
            set_executor(root, address)
            first[name] = round(shards_stage(root, doit_args), 3)
        shards = len(list((root / "shards").rglob("*.npy")))
        walls: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):  # interleaved: a noisy neighbour hits every variant alike
            for name, (address, doit_args) in variants.items():
                set_executor(root, address)
                walls[name].append(shards_stage(root, doit_args))
        set_executor(root, clusters[1].scheduler_address)
        with distributed.Client(clusters[1], set_as_default=False) as client:
            overhead = driver_overhead(root, client, shards)
    finally:
        cluster.close()
        for c in clusters.values():
            c.close()
    return {"bench": "cluster", "cpus": os.cpu_count(),
            "loadavg": [round(v, 2) for v in os.getloadavg()],
            "python": sys.version.split()[0], "backend": args.backend, "tiles": tiles,
            "shards": shards,
            "input": args.input, "batch": 32, "batches_per_task": cluster.BATCHES_PER_TASK,
            "doit_inflight_cluster": args.inflight,
            "tiles_per_s": {name: round(tiles / statistics.median(w), 1)
                            for name, w in walls.items()},
            "rounds_s": {name: [round(v, 3) for v in w] for name, w in walls.items()},
            "first_run_s": first, "driver": overhead}


if __name__ == "__main__":
    main()
