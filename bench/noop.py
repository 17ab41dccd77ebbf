"""No-op `doit build_cache` wall time at 10^3..10^6 tiles beside bare doit and ninja on the same
files, interleaved round by round (medians); prints JSON. Run as
`env -u PYTHONDONTWRITEBYTECODE python bench/noop.py --sizes 100000,1000000` (bytecode cached)."""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import resource
import shutil
import statistics
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
HEAVY = ("numpy", "onnxruntime", "faiss", "openvino", "cryptography", "onnx", "PIL", "rich")
ENV = ({k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
       | {"C10_NO_PROGRESS": "1"})
# The installed console script, as an operator runs it: `python -m doit` would put the cache
# directory first on sys.path, which c10's loader (doit.cfg) exists to avoid.
DOIT = str(Path(sys.executable).with_name("doit"))

BARE_DODO = '''import os
DOIT_CONFIG = {"backend": "sqlite3", "dep_file": ".doit.sqlite", "verbosity": 0}
GROUP = %d

def _files():
    out = []
    for z in sorted(os.listdir("tiles")):
        for x in sorted(os.listdir(f"tiles/{z}")):
            out += [f"tiles/{z}/{x}/{y}" for y in sorted(os.listdir(f"tiles/{z}/{x}"))]
    return out

def ok():
    return True

def task_f():
    files = _files()
    for i in range(0, len(files), GROUP):
        yield {"name": str(i), "file_dep": files[i:i + GROUP], "actions": [ok]}
'''


def tile_bytes(count: int = 8) -> list[bytes]:
    """A few distinct tiny JPEGs: a no-op never decodes them, a cold build stays cheap."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8)).save(buf, "JPEG", quality=80)
        out.append(buf.getvalue())
    return out


def write_tiles(root: Path, n: int) -> tuple[float, float, float, float]:
    """n tiles in a square around CENTER at ZOOM; returns the bbox (lat/lon) that holds them."""
    centre = mercantile.tile(*CENTER, ZOOM)
    side = int(np.ceil(np.sqrt(n)))
    x0, y0 = centre.x - side // 2, centre.y - side // 2
    blobs = tile_bytes()
    for i in range(n):
        x, y = x0 + i // side, y0 + i % side
        path = root / "tiles" / str(ZOOM) / str(x) / f"{y}.jpg"
        if y == y0:
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blobs[i % len(blobs)])
    west, north = mercantile.ul(x0, y0, ZOOM)
    east, south = mercantile.ul(x0 + side, y0 + side, ZOOM)
    inset = 1e-7  # keep the bbox strictly inside the square's outer edges
    return (south + inset, west + inset, north - inset, east - inset)


def make_c10(root: Path, n: int, key: Path, block: int) -> None:
    bbox = write_tiles(root, n)
    netgen.write_global_model(root / "models" / "global.onnx", input_size=32, dim=16)
    init_cache(root, bbox=str(list(bbox)), zooms=f"[{ZOOM}]", backend="onnxruntime", size=32,
               key=str(key))
    text = (root / "c10.toml").read_text()
    text = text.split("[models.local]")[0] + "[shards]" + text.split("[shards]")[1]
    # n tiles fill the square's first n slots: the rest are missing, which the bench allows
    text = text.replace("require_complete = true", "require_complete = false")
    (root / "c10.toml").write_text(text.replace("block = 16", f"block = {block}"))


def make_bare(root: Path, src: Path, group: int) -> None:
    """The same tile files (hard links: no copy of 10^6 files) under a bare dodo.py with `group`
    files per task (md5 checker)."""
    shutil.copytree(src / "tiles", root / "tiles", copy_function=os.link)
    (root / "dodo.py").write_text(BARE_DODO % group)


def make_ninja(root: Path, tiles: Path, group: int) -> Path:
    """build-{group}.ninja in `root` (beside the c10 cache: c10's coverage gate would refuse
    ninja's files inside it) over the cache's own tiles: one stamp edge per `group` files. The
    stamps are made here, newer than every tile, and the rule is a generator (no build-log entry
    needed): a first build would spawn one `touch` per edge (10^6 processes at 10^6 tiles), and a
    no-op is the same stat of every input and output either way (only the log lookup is spared)."""
    files = sorted(os.path.relpath(p, root) for p in tiles.rglob("*.jpg"))
    lines = ["rule stamp", "  command = touch $out", "  generator = 1", ""]
    stamps = root / f"stamps-{group}"
    stamps.mkdir(parents=True, exist_ok=True)
    for i in range(0, len(files), group):
        lines.append(f"build {stamps.name}/{i}: stamp {' '.join(files[i:i + group])}")
        (stamps / str(i)).touch()
    build_file = root / f"build-{group}.ninja"
    build_file.write_text("\n".join(lines) + "\n")
    return build_file


def run(cmd: list[str], cwd: Path, env: dict | None = None) -> tuple[float, str, int]:
    """(wall seconds, output, peak RSS in KB) of one command; a failure stops the bench."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env or ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out = proc.communicate()[0]
    elapsed = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest child so far
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} in {cwd} failed:\n{out}")
    return elapsed, out, rss


def interleaved(commands: dict[str, tuple[list[str], Path]], runs: int) -> dict:
    """Each command once per round, round after round (a noisy shared host drifts: every
    command sees the same drift); median and best wall time per command."""
    times: dict[str, list[float]] = {label: [] for label in commands}
    for _ in range(runs):
        for label, (cmd, cwd) in commands.items():
            times[label].append(run(cmd, cwd)[0])
    return {label: {"median_s": round(statistics.median(t), 3), "min_s": round(min(t), 3)}
            for label, t in times.items()}


def peak_rss_kb(cmd: list[str], cwd: Path) -> int:
    """Peak RSS of one run of `cmd`, from a fresh interpreter (RUSAGE_CHILDREN keeps the max)."""
    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
            "stdout=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN)"
            ".ru_maxrss)")
    return int(run([sys.executable, "-c", code, *cmd], cwd)[1].split()[-1])


def free_space_check(work: Path, sizes: list[int]) -> None:
    """Refuse before writing anything when the largest size does not fit: each tile is a file
    (a 4 KiB block) in the c10 cache, hard-linked (no copy) for bare doit, plus the hash cache,
    the scan memo and doit's DB (~300 bytes a tile)."""
    need = max(sizes) * (4096 + 300) * 1.2
    free = shutil.disk_usage(work).free
    if free < need:
        raise SystemExit(f"{work}: {free / 2**30:.1f} GiB free, the bench at {max(sizes)} tiles "
                         f"needs ~{need / 2**30:.1f} GiB; free space or pass --workdir on a "
                         "larger disk")


def doit_cmd(*args: str) -> list[str]:
    return [DOIT, *args]


def heavy_imports(cwd: Path) -> list[str]:
    """Heavy top-level modules a no-op imports (from `python -X importtime`)."""
    _, err, _ = run([sys.executable, "-X", "importtime", DOIT, "build_cache"], cwd)
    names = {m.group(1).split(".")[0] for m in re.finditer(r"\|\s+(\S+)\s*$", err, re.M)}
    return sorted(names & set(HEAVY))


def bench_size(work: Path, n: int, key: Path, args) -> dict:
    cache = work / f"c10-{n}"
    start = time.perf_counter()
    make_c10(cache, n, key, args.block)
    made = time.perf_counter() - start
    cold, _, _ = run(doit_cmd("build_cache"), cache)
    out = run(doit_cmd("build_cache"), cache)[1]
    ran = re.findall(r"^\.  (\S+)", out, re.M)
    tasks = len(run(doit_cmd("list", "--all", "-q"), cache)[1].split())
    result = {"tiles": n, "block": args.block, "tasks": tasks, "write_tiles_s": round(made, 1),
              "cold_build_s": round(cold, 1), "noop_ran": ran,
              "heavy_modules_imported": heavy_imports(cache),
              "c10_noop_peak_rss_mb": round(peak_rss_kb(doit_cmd("build_cache"), cache) / 1024)}
    shard_tiles = args.block ** 2  # the same coarse grouping as c10's shards
    commands = {"c10_noop": (doit_cmd("build_cache"), cache)}
    bare_dirs = []
    for label, group in (("bare_doit_per_file", 1),
                         (f"bare_doit_coarse_{shard_tiles}_per_task", shard_tiles)):
        if group == 1 and n > args.max_fine:
            result[label] = f"skipped (n > --max-fine {args.max_fine})"
            continue
        bare = work / f"bare-{n}-{group}"
        make_bare(bare, cache, group)
        run(doit_cmd(), bare)
        commands[label] = (doit_cmd(), bare)
        bare_dirs.append(bare)
    ninja_dir = work / f"ninja-{n}"
    if shutil.which("ninja"):
        for group in (1, shard_tiles):
            ninja = ["ninja", "-f", make_ninja(ninja_dir, cache / "tiles", group).name]
            if "no work to do" not in run(ninja, ninja_dir)[1]:
                raise SystemExit(f"ninja had work to do in {ninja_dir}: its stamps are not current")
            commands[f"ninja_{group}_per_edge"] = (ninja, ninja_dir)
    result.update(interleaved(commands, args.runs))
    shutil.rmtree(ninja_dir, ignore_errors=True)
    for bare in bare_dirs:
        shutil.rmtree(bare)
    shutil.rmtree(cache)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--block", type=int, default=16,
                        help="shards.block (default 16: 256 tiles a shard)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-fine", type=int, default=100000,
                        help="largest n for one doit task per file")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where the caches are made (and removed afterwards)")
    args = parser.parse_args()
    sizes = [int(n) for n in args.sizes.split(",")]
    free_space_check(args.workdir, sizes)
    with tempfile.TemporaryDirectory(prefix="c10-bench-noop-", dir=args.workdir) as tmp:
        work = Path(tmp)
        key = work / "key.pem"
        generate_key(key)
        results = [bench_size(work, n, key, args) for n in sizes]
    print(json.dumps({"bench": "noop", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                      "cpus": os.cpu_count(), "loadavg": [round(v, 2) for v in os.getloadavg()],
                      "results": results}, indent=2))


if __name__ == "__main__":
    main()
