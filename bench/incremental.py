"""Incremental cost: a 10k-tile cache gains 1 % new tiles (random holes: nearly every block is
touched); each stage's time of that rebuild vs the cold build, from .c10/report.json; prints JSON.
Run as `env -u PYTHONDONTWRITEBYTECODE python bench/incremental.py`."""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mercantile
import numpy as np
from PIL import Image

from c10.tools import netgen
from c10.tools.project import init_cache
from c10.trust.keys import generate_key

CENTER = (30.5234, 50.4501)  # lon, lat: Kyiv
ZOOM = 17
STAGES = ("load", "engines", "shards", "index", "coverage", "manifest")
ENV = ({k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
       | {"C10_NO_PROGRESS": "1"})
DOIT = str(Path(sys.executable).with_name("doit"))  # the console script, never `python -m doit`


def tile_jpeg(rng: np.random.Generator, size: int) -> bytes:
    """A distinct small JPEG: smooth noise, so each tile has its own descriptor."""
    small = rng.integers(0, 255, (4, 4, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((size, size), Image.BICUBIC).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def layout(n: int, extra: int, seed: int,
           spread: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]], tuple]:
    """(first build's x/y, the added x/y, bbox): n + extra slots in a square; the added ones are
    random holes (`random`: nearly every block changes) or the square's last strip (`strip`)."""
    side = int(np.ceil(np.sqrt(n + extra)))
    centre = mercantile.tile(*CENTER, ZOOM)
    x0, y0 = centre.x - side // 2, centre.y - side // 2
    slots = [(x0 + i // side, y0 + i % side) for i in range(n + extra)]
    if spread == "random":
        rng = np.random.default_rng(seed)
        held = set(rng.choice(len(slots), size=extra, replace=False).tolist())
    else:
        held = set(range(len(slots) - extra, len(slots)))
    west, north = mercantile.ul(x0, y0, ZOOM)
    east, south = mercantile.ul(x0 + side, y0 + side, ZOOM)
    bbox = (south + 1e-7, west + 1e-7, north - 1e-7, east - 1e-7)
    return [s for i, s in enumerate(slots) if i not in held], [slots[i] for i in sorted(held)], bbox


def write_tiles(root: Path, slots, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for x, y in slots:
        path = root / "tiles" / str(ZOOM) / str(x) / f"{y}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(tile_jpeg(rng, size))


def make_cache(root: Path, key: Path, args, extra: int | None = None,
               stride: str | None = None) -> list[tuple[int, int]]:
    """The first build's cache (tiles, model, c10.toml); the slots the later build adds."""
    if extra is None:
        extra = args.tiles * args.percent // 100
    first, added, bbox = layout(args.tiles, extra, args.seed, getattr(args, "spread", "random"))
    write_tiles(root, first, args.tile_size, args.seed)
    netgen.write_global_model(root / "models" / "global.onnx", input_size=args.input, dim=args.dim)
    init_cache(root, bbox=str(list(bbox)), zooms=f"[{ZOOM}]", backend=args.backend,
               size=args.input, key=str(key))
    text = (root / "c10.toml").read_text()
    text = text.split("[models.local]")[0] + "[shards]" + text.split("[shards]")[1]
    # the first build has holes where the added tiles go: missing tiles are allowed here
    text = text.replace("require_complete = true", "require_complete = false")
    text = text.replace("block = 16", f"block = {args.block}"
                        + (f"\nstride = {stride}" if stride else ""))
    factory = getattr(args, "factory", "Flat")
    (root / "c10.toml").write_text(text.replace('factory = "Flat"', f'factory = "{factory}"'))
    return added


def build(root: Path) -> dict:
    """One `doit build_cache` as an operator runs it: wall time and the BuildReport's stages."""
    start = time.perf_counter()
    proc = subprocess.run([DOIT, "build_cache"], cwd=root, env=ENV,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"build failed in {root}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    report = json.loads((root / ".c10" / "report.json").read_text())
    return {"wall_s": wall, "stages": {s: report["stages"][s]["seconds"] for s in STAGES},
            "ran": {s: report["stages"][s]["ran"] for s in STAGES},
            "embedded": report["descriptors_generated"], "reused": report["descriptors_reused"]}


def compare(cold: dict, incr: dict) -> dict:
    def pct(a: float, b: float) -> float:
        return round(100.0 * b / a, 2) if a else None

    stages = {s: {"cold_s": round(cold["stages"][s], 3),
                  "incremental_s": round(incr["stages"][s], 3),
                  "pct": pct(cold["stages"][s], incr["stages"][s]),
                  "tasks_ran": [cold["ran"][s], incr["ran"][s]]} for s in STAGES}
    work = ("shards", "index", "coverage", "manifest")
    cold_work, incr_work = (sum(r["stages"][s] for s in work) for r in (cold, incr))
    return {"stages": stages,
            "work_stages": {"cold_s": round(cold_work, 2), "incremental_s": round(incr_work, 2),
                            "pct": pct(cold_work, incr_work)},
            "wall": {"cold_s": round(cold["wall_s"], 2), "incremental_s": round(incr["wall_s"], 2),
                     "pct": pct(cold["wall_s"], incr["wall_s"])},
            "descriptors": {"cold_embedded": cold["embedded"],
                            "incremental_embedded": incr["embedded"],
                            "incremental_reused": incr["reused"]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiles", type=int, default=10000)
    parser.add_argument("--percent", type=int, default=1)
    parser.add_argument("--tile-size", type=int, default=256)
    # The model `c10 init` and `c10 demo` write (224 px in, 256-d out). --input 64 --dim 64 makes
    # embedding ~10x cheaper: the worst case for the fixed per-shard/index/Manifest costs.
    parser.add_argument("--input", type=int, default=224,
                        help="global model input size (default 224)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--factory", default="Flat")
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--then-block", type=int, default=0,
                        help="after the incremental build, rebuild with shards.block = N (every "
                             "tile moves to another shard): its wall time and rows embedded")
    parser.add_argument("--spread", choices=("random", "strip"), default="random",
                        help="where the new tiles go: random holes (default, the worst case) "
                             "or one strip")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="c10-bench-incr-") as tmp:
        work = Path(tmp)
        generate_key(work / "key.pem")
        root = work / "cache"
        added = make_cache(root, work / "key.pem", args)
        cold = build(root)
        noop = build(root)
        write_tiles(root, added, args.tile_size, args.seed + 1)
        incr = build(root)
        reblock = rebuild_with_block(root, args.then_block) if args.then_block else None
    print(json.dumps({"bench": "incremental", "cpus": os.cpu_count(),
                      "loadavg": [round(v, 2) for v in os.getloadavg()],
                      "setup": {"tiles": args.tiles, "added": len(added), "tile_px": args.tile_size,
                                "model_input": args.input, "dim": args.dim, "block": args.block,
                                "factory": args.factory, "backend": args.backend,
                                "spread": args.spread},
                      "noop_wall_s": round(noop["wall_s"], 3), **compare(cold, incr)}
                     | ({"then_block": reblock} if reblock else {}), indent=2))


def rebuild_with_block(root: Path, block: int) -> dict:
    """shards.block changed: every shard is a new task over tiles embedded before."""
    text = (root / "c10.toml").read_text()
    (root / "c10.toml").write_text(re.sub(r"(?m)^block = \d+", f"block = {block}", text, count=1))
    result = build(root)
    return {"block": block, "wall_s": round(result["wall_s"], 2), "embedded": result["embedded"],
            "reused": result["reused"], "shards_s": round(result["stages"]["shards"], 2)}


if __name__ == "__main__":
    main()
