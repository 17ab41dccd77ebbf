"""OpenVINO runner stress: hundreds of small selftests and builds beside a CPU hog, each run in its
own process under a hard timeout (a timeout is a hang: its stacks are dumped, then it is
killed); prints JSON (runs, hangs, failures, seconds, per kind).

    python bench/ov_stress.py --runs 300 --hog 2 --timeout 60            # the code as it is
    python bench/ov_stress.py --runs 100 --hog 2 --revert-fix            # the code before the fix

Kinds, in turn (--kinds):
  selftest  `c10 selftest DIR -n 10 --trusted-keys KEY` (the reported command)
  threads   one process, `--threads` selftests at once through c10.query.flight.FlightCache,
            started together on a barrier (every thread makes its first inference call at once)
  build     --build-tiles tiles of the cache re-encoded (new bytes: the build is content-hashed,
            a bare touch is a no-op), then `doit build_cache` in the cache: their blocks
            re-embedded (global and local models), index, Manifest

Variants (--variant; --revert-fix is --variant before): the fix is never switched off through the
production code (no knob there): a run of another variant starts this script as its child,
which patches c10 in its own process and then runs the same console script (`runpy`) or the
same API calls.
  after        nothing patched; selftest and build run the installed console scripts as they are
  before       the runner before the fix: one queue of `streams` shared requests handed from
               thread to thread (`shared_queue_runner` below, the code as it was), and no warm-up
               `Tensor.data` call in `import_openvino`
  no-warmup    today's runner, without the warm-up call
  shared-queue the old shared-queue runner, with the warm-up call

The cache (`c10 demo DIR --backend openvino --tiles 40`) is made once in --work and reused; every
process runs with XDG_STATE_HOME/XDG_CONFIG_HOME inside --work, so the demo key, the verifier's
state and the build ledgers never touch this host's own c10 state.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import re
import runpy
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve()
VARIANTS = ("after", "before", "no-warmup", "shared-queue")
KINDS = ("selftest", "threads", "build")


# --- the child: patches, then the console script or the API ----------------------------------

def patch(variant: str) -> None:
    """Make this process run `variant` (before anything imports openvino)."""
    from c10.features.backends import openvino as ov_backend

    if variant in ("before", "no-warmup"):
        ov_backend._numpy_bridge_ready = True  # import_openvino then skips its warm-up call
    if variant in ("before", "shared-queue"):
        ov_backend.OvRunner = shared_queue_runner()  # what OpenVinoBackend._load constructs


def shared_queue_runner():
    from c10.features.backends import Runner, run_chunked

    class SharedQueueRunner(Runner):
        """OvRunner before the fix, verbatim: `streams` requests in one queue, each taken by
        whichever thread calls next (its `Tensor.data` first calls made by any thread)."""

        def __init__(self, compiled, max_batch: int | None) -> None:
            self.compiled = compiled
            requests = [compiled.create_infer_request() for _ in range(
                max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS") or 1)))]
            self.streams = len(requests)
            self._free: queue.SimpleQueue = queue.SimpleQueue()
            for request in requests:
                self._free.put(request)
            self.input_names = [i.get_any_name() for i in compiled.inputs]
            self.output_names = [o.get_any_name() for o in compiled.outputs]
            self.max_batch = max_batch

        def run_stream(self, feeds):
            request = self._free.get()
            try:
                return run_chunked(lambda part: self._infer(request, part), feeds, self.max_batch)
            finally:
                self._free.put(request)

        def _infer(self, request, feeds):
            import numpy as np

            request.infer(feeds, share_inputs=False)
            return [np.array(request.get_output_tensor(i).data, copy=True)
                    for i in range(len(self.output_names))]

    return SharedQueueRunner


def child(argv: list[str]) -> int:
    """`_child VARIANT script SCRIPT ARGS...` or `_child VARIANT threads DIR KEY THREADS N`."""
    variant, mode, *rest = argv
    patch(variant)
    if mode == "script":
        sys.argv = rest
        runpy.run_path(rest[0], run_name="__main__")
        return 0
    root, key, threads, n = rest[0], rest[1], int(rest[2]), int(rest[3])
    return threaded_selftests(Path(root), Path(key), threads, n)


def threaded_selftests(root: Path, key: Path, threads: int, n: int) -> int:
    """`threads` selftests at once on one FlightCache (one searcher, so one runner)."""
    from c10.query.flight import FlightCache
    from c10.query.search import selftest

    cache = FlightCache.open(root, [key])
    searcher, _ = cache.searcher()
    cache.tiles  # noqa: B018 (its cached property, filled before the threads start)
    start = threading.Barrier(threads)
    results: list = [None] * threads

    def work(i: int) -> None:
        start.wait()
        results[i] = selftest(searcher, cache.load_tile, n, seed=i)

    pool = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    bad = [r for r in results if r is None or r.n != min(n, len(searcher.ids))]
    print(json.dumps({"threads": threads, "recall@1": [r.recall_at_1 for r in results if r]}))
    return 1 if bad else 0


# --- the parent: cache, hog, runs ----------------------------------------------------------------

def console(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def make_cache(work: Path, env: dict) -> tuple[Path, Path]:
    """The demo cache in work/cache (made once) and its public key."""
    root, keyfile = work / "cache", work / "cache.key"
    if not (root / "Manifest.json").exists() or not keyfile.exists():
        shutil.rmtree(root, ignore_errors=True)
        out = subprocess.run([console("c10"), "demo", str(root), "--backend", "openvino",
                              "--tiles", "40"], env=env, capture_output=True, text=True,
                             timeout=600)
        if out.returncode != 0:
            raise SystemExit(f"c10 demo failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        keyfile.write_text(re.search(r"--trusted-keys (\S+)", out.stdout).group(1))
    return root, Path(keyfile.read_text().strip())


def start_hog(n: int) -> list[subprocess.Popen]:
    """n busy processes at the runs' own priority (the shared machine of the report)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


class Tiles:
    """Tiles of the cache to rewrite, a few at a time, so each build has new bytes to embed (only
    changed tiles are embedded: the rest of a shard's rows are carried over)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.paths = sorted((root / "tiles").rglob("*.jpg"))
        self.turn = 0

    def change(self, n: int) -> list[str]:
        from PIL import Image

        picked = []
        for _ in range(min(n, len(self.paths))):
            path = self.paths[(self.turn * 7) % len(self.paths)]  # 7: coprime, spread over blocks
            self.turn += 1
            with Image.open(path) as img:
                img = img.convert("RGB")
            x = self.turn % img.width
            r, g, b = img.getpixel((x, 0))
            img.putpixel((x, 0), ((r + 97) % 256, g, b))
            tmp = path.with_suffix(".tmp")
            img.save(tmp, "JPEG", quality=95)
            os.replace(tmp, path)
            picked.append(str(path.relative_to(self.root)))
        return picked


def command(kind: str, variant: str, root: Path, key: Path, threads: int) -> tuple[list, Path]:
    """(argv, cwd) of one run."""
    wrap = [sys.executable, str(HERE), "_child", variant, "script"]
    if kind == "selftest":
        argv = [console("c10"), "selftest", str(root), "-n", "10", "--trusted-keys", str(key)]
    elif kind == "build":
        argv = [console("doit"), "build_cache"]
    else:
        return [sys.executable, str(HERE), "_child", variant, "threads", str(root), str(key),
                str(threads), "10"], root
    return (argv if variant == "after" else wrap + argv), root


def dump_stacks(pid: int, out: Path) -> str:
    """Every thread's stack of a hung process: py-spy (Python and native frames), else gdb."""
    pyspy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    attempts = ([[pyspy, "dump", "--native", "--pid", str(pid)], [pyspy, "dump", "--pid", str(pid)]]
                if pyspy else [])
    if shutil.which("gdb"):
        attempts.append(["gdb", "-p", str(pid), "-batch", "-ex", "thread apply all bt"])
    for argv in attempts:
        try:
            got = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            continue
        if got.returncode == 0 and got.stdout.strip():
            out.write_text(f"$ {' '.join(argv)}\n{got.stdout}")
            return argv[0].rsplit("/", 1)[-1] + (" --native" if "--native" in argv else "")
    out.write_text("no stack dump: " + ("py-spy/gdb failed" if attempts else "no py-spy or gdb"))
    return "none"


def hung_frames(dump: Path) -> list[str]:
    """The c10/openvino Python frames of the dump, innermost first, deduplicated."""
    seen: list[str] = []
    for line in dump.read_text().splitlines():
        m = re.match(r"\s+(\S+) \((\S*?(c10|openvino)/\S+):\d+\)", line)
        if m and m.group(1) not in seen:
            seen.append(m.group(1))
    return seen[:12]


def one_run(argv: list, cwd: Path, env: dict, timeout: float, logs: Path, tag: str) -> dict:
    log = logs / f"{tag}.log"
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            code = proc.wait(timeout)
            hung, tool = False, None
        except subprocess.TimeoutExpired:
            hung, code = True, None
            tool = dump_stacks(proc.pid, logs / f"{tag}.stacks.txt")
        finally:  # hung, or this script was stopped: the run and its children go
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    seconds = time.perf_counter() - start
    rec = {"seconds": round(seconds, 2), "hung": hung, "code": code, "log": str(log)}
    if hung:
        rec["stacks"] = str(logs / f"{tag}.stacks.txt")
        rec["stack_tool"] = tool
        rec["frames"] = hung_frames(logs / f"{tag}.stacks.txt")
        # the Tensor.data deadlock: one thread holds the GIL waiting on a static's guard, the
        # thread inside that static's initialiser waits for the GIL
        rec["static_init_deadlock"] = "__cxa_guard_acquire" in (
            logs / f"{tag}.stacks.txt").read_text()
    return rec


class Stopped(Exception):
    pass


def _stop(signum, frame):
    raise Stopped


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=300, help="runs in all, kinds in turn")
    ap.add_argument("--hog", type=int, default=2, help="busy processes beside the runs")
    ap.add_argument("--timeout", type=float, default=60.0, help="a run longer than this hangs")
    ap.add_argument("--revert-fix", action="store_true", help="same as --variant before")
    ap.add_argument("--variant", choices=VARIANTS, default="after")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma list of {', '.join(KINDS)}")
    ap.add_argument("--threads", type=int, default=4, help="selftests at once in a threads run")
    ap.add_argument("--build-tiles", type=int, default=8,
                    help="tiles a build run re-encodes (its blocks embedded by several threads)")
    ap.add_argument("--timebox", type=float, default=0,
                    help="stop starting runs after this many seconds (0: none)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "c10-ov-stress",
                    help="cache, per-run logs and stack dumps (reused across invocations)")
    ap.add_argument("--json-out", type=Path, help="also write the JSON here")
    args = ap.parse_args(argv)
    variant = "before" if args.revert_fix else args.variant
    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds or set(kinds) - set(KINDS):
        ap.error(f"--kinds: a comma list of {', '.join(KINDS)}")

    # stopped (a TERM, or an INT even when started in the background): the current run is
    # killed, the hog too, and the runs so far are reported
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, XDG_STATE_HOME=str(work / "state"),
               XDG_CONFIG_HOME=str(work / "config"), PYTHONFAULTHANDLER="1")
    root, key = make_cache(work, env)
    logs = work / "runs" / f"{variant}-{time.strftime('%Y%m%d-%H%M%S')}"
    logs.mkdir(parents=True)
    tiles = Tiles(root)
    per = {k: {"runs": 0, "hangs": 0, "failures": 0, "seconds": []} for k in kinds}
    problems: list[dict] = []
    load_before = [round(x, 2) for x in os.getloadavg()]
    hog = start_hog(args.hog)
    t0 = time.perf_counter()
    stopped = False
    try:
        for i in range(args.runs):
            if args.timebox and time.perf_counter() - t0 > args.timebox:
                break
            kind = kinds[i % len(kinds)]
            changed = tiles.change(args.build_tiles) if kind == "build" else None
            run_argv, cwd = command(kind, variant, root, key, args.threads)
            rec = one_run(run_argv, cwd, env, args.timeout, logs, f"{i:04d}-{kind}")
            stats = per[kind]
            stats["runs"] += 1
            stats["seconds"].append(rec["seconds"])
            if rec["hung"] or rec["code"] != 0:
                stats["hangs" if rec["hung"] else "failures"] += 1
                problems.append({"run": i, "kind": kind, "changed_tiles": changed, **rec})
                print(f"run {i} {kind}: {'HANG' if rec['hung'] else 'exit ' + str(rec['code'])}"
                      f" ({rec['log']})", file=sys.stderr, flush=True)
                if kind == "build":  # leave the cache consistent for the runs after it
                    one_run([console("doit"), "build_cache"], root, env, 300, logs,
                            f"{i:04d}-repair")
            if (i + 1) % 25 == 0:
                print(f"{i + 1} runs, {sum(s['hangs'] for s in per.values())} hangs, "
                      f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    except Stopped:
        stopped = True
    finally:
        for p in hog:
            p.kill()
            p.wait()
    wall = time.perf_counter() - t0

    def summary(s: dict) -> dict:
        secs = s.pop("seconds")
        return s | {"seconds": round(sum(secs), 1),
                    "median_s": round(statistics.median(secs), 2) if secs else None,
                    "max_s": max(secs, default=None)}

    result = {
        "variant": variant, "hog": args.hog, "timeout_s": args.timeout, "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "runs": sum(s["runs"] for s in per.values()),
        "hangs": sum(s["hangs"] for s in per.values()),
        "failures": sum(s["failures"] for s in per.values()),
        "seconds": round(wall, 1), "stopped_early": stopped,
        "per_kind": {k: summary(s) for k, s in per.items()},
        "problems": problems, "logs": str(logs),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        sys.exit(child(sys.argv[2:]))
    sys.exit(main())
