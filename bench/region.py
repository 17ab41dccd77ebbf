"""A region end to end at 10⁵–10⁶ tiles: cold build, no-op, +1 % as random holes, +1 % as a strip,
verify, pack; each stage's wall time, peak RSS and disk, beside bare doit and ninja no-ops over the
same tiles in the same run; prints JSON. Run as `env -u PYTHONDONTWRITEBYTECODE python
bench/region.py --tiles 1000000` (32-px tiles and model: the fixed costs dominate)."""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import incremental  # noqa: E402
import noop  # noqa: E402
import numpy as np  # noqa: E402

from c10.tools import netgen  # noqa: E402
from c10.tools.project import init_cache  # noqa: E402
from c10.trust.keys import generate_key, load_signing_key, public_key_pem  # noqa: E402

C10 = str(Path(sys.executable).with_name("c10"))
BYTES_PER_TILE = 6_000  # a 64-px JPEG, its hash-cache row, its shard row and its Manifest row


def timed(cmd: list[str], cwd: Path, check: bool = True) -> dict:
    """Run cmd; wall time and the peak RSS of its process tree (wait4's rusage)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=incremental.ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if check and proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} in {cwd} failed ({proc.returncode}):\n"
                         f"{out.decode(errors='replace')[-4000:]}")
    return {"wall_s": round(wall, 3), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "exit": proc.returncode}


def jpeg_pool(size: int, count: int, seed: int) -> list[bytes]:
    """`count` distinct small JPEGs (incremental.tile_jpeg)."""
    rng = np.random.default_rng(seed)
    return [incremental.tile_jpeg(rng, size) for _ in range(count)]


def write_tiles(root: Path, slots, pool: list[bytes], salt: int) -> float:
    """One file per slot, each with its own bytes: a pool image with the slot in a JPEG comment
    (COM) segment, so no two tiles share a blake3 and the cold build embeds every one of them
    (writing 10⁶ distinct encodes would take longer than the build). Two processes, by column."""
    start = time.perf_counter()
    slots = list(slots)
    halves = [[s for s in slots if s[0] % 2 == part] for part in (0, 1)]
    with multiprocessing.get_context("fork").Pool(2) as workers:
        workers.starmap(_write_slots, [(root, half, pool, salt) for half in halves])
    return round(time.perf_counter() - start, 1)


def _write_slots(root: Path, slots, pool: list[bytes], salt: int) -> None:
    made = set()
    for x, y in slots:
        column = root / "tiles" / str(incremental.ZOOM) / str(x)
        if x not in made:
            column.mkdir(parents=True, exist_ok=True)
            made.add(x)
        tag = f"{salt}/{x}/{y}".encode()
        data = pool[(x * 7919 + y * 104729 + salt) % len(pool)]
        (column / f"{y}.jpg").write_bytes(data[:2] + b"\xff\xfe" + (len(tag) + 2).to_bytes(2, "big")
                                          + tag + data[2:])


def disk_mb(path: Path) -> float:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return round(total / 2**20, 1)


def build(root: Path) -> dict:
    """`doit build_cache` as an operator runs it, with its report's stages and counts."""
    result = timed([incremental.DOIT, "build_cache"], root)
    report = json.loads((root / ".c10" / "report.json").read_text())
    stages = {s: round(report["stages"][s]["seconds"], 2) for s in incremental.STAGES}
    return result | {"stages": stages, "embedded": report["descriptors_generated"],
                     "reused": report["descriptors_reused"]}


def baselines(work: Path, root: Path, block: int, runs: int) -> dict:
    """No-ops interleaved round by round (bench/noop.py): c10's, bare doit's (one task per block's
    worth of files, hard links to the cache's tiles) and ninja's (one edge per tile, and per
    block) over the same tile files."""
    group = block * block
    bare, ninja_dir = work / "bare", work / "ninja"
    noop.make_bare(bare, root, group)
    noop.run(noop.doit_cmd(), bare)
    commands = {"c10": (noop.doit_cmd("build_cache"), root),
                f"bare_doit_{group}_per_task": (noop.doit_cmd(), bare)}
    if shutil.which("ninja"):
        for edge in (1, group):
            cmd = ["ninja", "-f", noop.make_ninja(ninja_dir, root / "tiles", edge).name]
            noop.run(cmd, ninja_dir)
            commands[f"ninja_{edge}_per_edge"] = (cmd, ninja_dir)
    out = noop.interleaved(commands, runs)
    shutil.rmtree(bare)
    shutil.rmtree(ninja_dir, ignore_errors=True)
    return out


def check_disk(work: Path, tiles: int) -> None:
    need = tiles * BYTES_PER_TILE * 2  # the cache and its flight image
    free = shutil.disk_usage(work).free
    if free < need:
        raise SystemExit(f"bench/region.py: {tiles} tiles need ~{need / 2**30:.1f} GiB free under "
                         f"{work}, {free / 2**30:.1f} GiB are; pass --dir on a larger disk")


def run_region(work: Path, args) -> dict:
    generate_key(work / "key.pem")
    pub = work / "operator.pub.pem"
    pub.write_bytes(public_key_pem(load_signing_key(work / "key.pem", passphrase=None,
                                                     cache_root=None)))
    root = work / "cache"
    extra = args.tiles * args.percent // 100
    # the first build holds holes where the random +1 % goes and misses the last strip
    first, holes, bbox = incremental.layout(args.tiles + extra, extra, args.seed, "random")
    strip, first = first[-extra:], first[:-extra]
    pool = jpeg_pool(args.tile_size, args.distinct, args.seed)
    setup_s = write_tiles(root, first, pool, 0)
    configure(root, work / "key.pem", args, bbox)
    stages = {"cold": build(root)}
    stages["noop"] = build(root)
    write_tiles(root, holes, pool, 1)
    stages["add_1pct_holes"] = build(root)
    write_tiles(root, strip, pool, 2)
    stages["add_1pct_strip"] = build(root)
    stages["noop_after"] = build(root)
    verify = [C10, "verify", str(root), "--trusted-keys", str(pub), "--state",
              str(work / "state.json")]
    stages["verify"] = timed(verify, work)
    disk = {"cache_mb": disk_mb(root)}
    base = None
    if not args.quick:
        stages["pack"] = timed([C10, "pack", str(root), str(work / "image"), "--trusted-keys",
                                str(pub), "--state", str(work / "state.json")], work)
        disk["image_mb"] = disk_mb(work / "image")
        shutil.rmtree(work / "image")
        base = baselines(work, root, args.block, args.runs)
    return {"setup": {"tiles_first_build": len(first), "added_holes": len(holes),
                      "added_strip": len(strip), "tile_px": args.tile_size,
                      "model_input": args.input, "dim": args.dim, "block": args.block,
                      "factory": args.factory, "backend": args.backend,
                      "write_tiles_s": round(setup_s, 1)},
            "stages": stages, "disk": disk, "noop_interleaved": base, "ratios": _ratios(stages)}


def configure(root: Path, key: Path, args, bbox: tuple) -> None:
    """The model and c10.toml of incremental.make_cache; the area is the whole square (the strip and
    the holes included) from the first build, which may therefore miss tiles."""
    netgen.write_global_model(root / "models" / "global.onnx", input_size=args.input, dim=args.dim)
    init_cache(root, bbox=str(list(bbox)), zooms=f"[{incremental.ZOOM}]", backend=args.backend,
               size=args.input, key=str(key))
    text = (root / "c10.toml").read_text()
    text = text.split("[models.local]")[0] + "[shards]" + text.split("[shards]")[1]
    text = text.replace("require_complete = true", "require_complete = false")
    text = text.replace("block = 16", f"block = {args.block}")
    (root / "c10.toml").write_text(text.replace('factory = "Flat"', f'factory = "{args.factory}"'))


def _ratios(stages: dict) -> dict:
    cold = stages["cold"]["wall_s"]
    return {f"{name}_pct_of_cold": round(100 * stages[name]["wall_s"] / cold, 2)
            for name in ("add_1pct_holes", "add_1pct_strip", "noop")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiles", type=int, default=100_000)
    parser.add_argument("--percent", type=int, default=1)
    parser.add_argument("--tile-size", type=int, default=32)
    parser.add_argument("--distinct", type=int, default=4096,
                        help="distinct images the tiles are drawn from (each file is unique)")
    parser.add_argument("--input", type=int, default=32, help="global model input size")
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--factory", default="IVF1024,PQ16")
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=int, default=3, help="no-op repetitions")
    parser.add_argument("--quick", action="store_true",
                        help="no pack and no bare doit/ninja baselines (the build stages only)")
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp "
                                                               "dir, removed afterwards)")
    args = parser.parse_args()
    parent = args.dir or Path(tempfile.gettempdir())
    check_disk(parent, args.tiles)
    with tempfile.TemporaryDirectory(prefix="c10-bench-region-", dir=parent) as tmp:
        result = run_region(Path(tmp), args)
        # printed before 10⁶ files are removed, which takes minutes
        print(json.dumps({"bench": "region", "cpus": os.cpu_count(),
                          "loadavg": [round(v, 2) for v in os.getloadavg()], **result}, indent=2),
              flush=True)


if __name__ == "__main__":
    main()
