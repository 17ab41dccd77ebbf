"""Crash bench: SIGKILL `doit build_cache` at random moments; the commit survives, a re-run
converges. Prints JSON.

    python bench/crash.py [--kills 300] [--seed 1] [--workdir DIR] [--keep]

Episodes alternate between cold builds (a fresh cache holding only inputs) and incremental
builds (a built cache whose tiles changed: one removed, one rewritten, or the reverse). In an
episode, 1-3 builds are killed after a delay drawn uniformly from [0, T] for every other kill and
from [S, T] for the rest, where T is an uncut first attempt's time and S the time until doit started
its first task (interpreter and graph load; both re-measured every 8 episodes); then one build runs
to completion. After every kill:

- the inputs (tiles, models, c10.toml, dodo.py, doit.cfg) are byte-identical;
- no file under engines/, shards/, index/ is torn (each parses), and no temp file is left there
  (writers stage their temp files in .c10/tmp/, which verify does not read);
- the committed Manifest is checked with `c10.trust.verify.verify_cache` and the trusted key:
  `verified`     it verifies; in an incremental episode every file that differs from its listing
                 must be a tile the operator changed before the build (those cannot verify until
                 a build re-signs them), and the only unlisted files the shards and index files
                 the killed build wrote under their content names, which verify accepts as pending;
  `torn-commit`  the kill fell between the envelope's and Manifest.json's renames (both files are
                 staged and fsynced first, so the window is two back-to-back renames): the pair
                 disagrees until the next build rolls Manifest.json forward (counted apart);
  `no-manifest`  a cold build killed before its first commit;
  anything else is a failure: a shard, index or engine file the Manifest lists changed, went
  missing, or an unlisted file that is not a pending content-named file.
After each episode's completed build: exit 0, the whole cache verifies, no temp file is left,
and shards/ and index/ are byte-identical to a clean build of the same inputs.

Then `c10 pack` of the built cache is SIGKILLed (--pack-kills, in episodes of 1-3 kills of packs
of one OUT, delays drawn as for builds: S is the time until pack says it is copying). After every
kill: the cache is byte-identical, and OUT is either absent (a temporary `.OUT.c10-pack-partial-*`
may be left beside it) or a complete image that verifies with `verify_cache(...,
airborne_fingerprints=this host's)`, i.e. `c10 verify OUT --airborne`. After each episode's
completed re-run of pack: exit 0, OUT verifies --airborne, no temporary dir of that OUT is left
(the re-run removed the killed packs' ones), and a further pack of the same OUT is refused with
OUT left byte-identical. `--kills` counts build kills, `--pack-kills` pack kills (`kills_total`).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import blake3

from c10.errors import VerifyError
from c10.store.atomic import is_temp_name
from c10.tools import netgen, synth
from c10.tools.project import init_cache
from c10.trust.keys import generate_key, keyid, load_signing_key, load_trusted_keys, public_key_pem
from c10.trust.verify import verify_cache

BBOX = (50.43, 30.49, 50.47, 30.56)  # ~42 tiles at zoom 15 near Kyiv, as the test fixture
ZOOMS = (15,)
DERIVED = ("engines", "shards", "index")
FILE_REASONS = {"hash-mismatch", "size-mismatch", "missing-file", "extra-file"}
ROLLED = "rolled Manifest.json forward"
DOIT = str(Path(sys.executable).with_name("doit"))  # the console script, never `python -m doit`
C10 = str(Path(sys.executable).with_name("c10"))
IMAGE_TOPS = ("tiles", "models", "engines", "shards", "index")
PAIR = ("Manifest.json", "Manifest.json.dsse")


class CrashFailure(Exception):
    """An invariant broke after a kill or a re-run."""


# ---------------------------------------------------------------- fixture

def make_inputs(work: Path) -> dict:
    """Key pair outside every cache, synthetic tiles and a small global model."""
    key = work / "operator.pem"
    generate_key(key)
    signer = load_signing_key(key, passphrase=None, cache_root=None)
    pub = work / "operator.pub.pem"
    pub.write_bytes(public_key_pem(signer))
    synth.make_tiles(work / "inputs" / "tiles", BBOX, ZOOMS, size=128)
    netgen.write_global_model(work / "inputs" / "models" / "global.onnx", input_size=64, dim=64)
    return {"key": key, "pub": pub, "keyid": keyid(signer), "inputs": work / "inputs",
            "trusted": load_trusted_keys([pub])}


def new_cache(root: Path, fx: dict, block: int = 4) -> Path:
    """A cache holding only inputs (tiles, the model, c10.toml, dodo.py)."""
    root.mkdir(parents=True)
    shutil.copytree(fx["inputs"] / "tiles", root / "tiles")
    shutil.copytree(fx["inputs"] / "models", root / "models")
    init_cache(root, bbox=str(list(BBOX)), zooms=str(list(ZOOMS)), backend="onnxruntime", size=64,
               key=str(fx["key"]), allowed=f'["{fx["keyid"]}"]', trusted=f'["{fx["pub"]}"]')
    text = (root / "c10.toml").read_text()
    start, end = text.find("[models.local]"), text.find("[shards]")
    if start >= 0 and end > start:
        text = text[:start] + text[end:]
    # state B removes a tile: an incomplete area is a build that must succeed here
    text = text.replace("require_complete = true", "require_complete = false")
    (root / "c10.toml").write_text(text.replace("block = 16", f"block = {block}"))
    return root


def set_state(root: Path, fx: dict, state: str) -> None:
    """A: every tile as made. B: tile 5 removed, tile 9 rewritten with tile 0's bytes. C: only the
    latter."""
    source = sorted((fx["inputs"] / "tiles").rglob("*.jpg"))
    rel = [p.relative_to(fx["inputs"]).as_posix() for p in source]
    for i in (5, 9):
        (root / rel[i]).parent.mkdir(parents=True, exist_ok=True)
        _put(source[i], root / rel[i])
    if state == "B":
        (root / rel[5]).unlink()
    if state in "BC":
        _put(source[0], root / rel[9])


def _put(source: Path, dest: Path) -> None:
    """Write a tile as `c10 import` does, by rename (a rewrite in place is seen only by the
    full-stat mode: README, what a no-op checks)."""
    tmp = dest.parents[3] / ".state-tmp"
    shutil.copyfile(source, tmp)
    os.replace(tmp, dest)


# ---------------------------------------------------------------- builds

def doit_build(root: Path) -> subprocess.Popen:
    """`doit build_cache` in `root` as its own process group (bytecode cached for speed)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["C10_NO_PROGRESS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"  # a killed build's output up to the kill says where it was
    return subprocess.Popen([DOIT, "build_cache"], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def complete_build(root: Path) -> tuple[float, str]:
    seconds, _, out = timed_build(root)
    return seconds, out


def timed_build(root: Path) -> tuple[float, float, str]:
    """Run a build to completion: (seconds, seconds until doit started its first task, output)."""
    started, first = time.perf_counter(), None
    proc = doit_build(root)
    lines = []
    for line in proc.stdout:
        if first is None and re.match(r"^[.-]  ", line):
            first = time.perf_counter() - started
        lines.append(line)
    proc.wait()
    out = "".join(lines)
    if proc.returncode != 0:
        raise CrashFailure(f"{root}: the re-run failed (exit {proc.returncode}): {out[-1500:]}")
    total = time.perf_counter() - started
    return total, first if first is not None else total, out


def killed_build(root: Path, delay: float) -> tuple[bool, str, float]:
    """Start a build and SIGKILL it after `delay`: (killed, output, seconds it ran)."""
    started = time.perf_counter()
    proc = doit_build(root)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return True, out, delay
    return False, proc.communicate()[0], time.perf_counter() - started


def stage_at_kill(out: str) -> str:
    """The stage of the last task doit started before the kill ("startup": none yet)."""
    started = re.findall(r"^[.-]  ([a-z_]+)", out, re.M)
    return started[-1] if started else "startup"


def clean_reference(root: Path, fx: dict, state: str) -> dict[str, str]:
    """shards/ and index/ bytes of an uninterrupted build of `state` from nothing (in-process)."""
    from c10.rules.driver import run_build

    new_cache(root, fx)
    set_state(root, fx, state)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        if run_build(root) != 0:
            raise CrashFailure(f"clean build of state {state} failed: {out.getvalue()[-1500:]}")
    return outputs(root)


# ---------------------------------------------------------------- checks

def digests(root: Path, tops: tuple[str, ...], names: tuple[str, ...] = ()) -> dict[str, str]:
    out = {}
    for top in tops:
        for path in sorted((root / top).rglob("*")):
            if path.is_file():
                digest = blake3.blake3(path.read_bytes()).hexdigest()
                out[path.relative_to(root).as_posix()] = digest
    for name in names:
        out[name] = blake3.blake3((root / name).read_bytes()).hexdigest()
    return out


def inputs_of(root: Path) -> dict[str, str]:
    return digests(root, ("tiles", "models"), ("c10.toml", "dodo.py", "doit.cfg"))


def outputs(root: Path) -> dict[str, str]:
    return digests(root, ("shards", "index"))


def temp_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if is_temp_name(p.name))


def torn_files(root: Path) -> list[str]:
    """Derived files that do not parse, and temp files there (writers stage them in .c10/tmp/)."""
    import faiss
    import numpy as np
    import onnx

    from c10.features.shards import read_shard

    bad = []
    for top in DERIVED:
        for path in sorted((root / top).rglob("*")):
            if not path.is_file():
                continue
            try:
                assert not is_temp_name(path.name)
                if top == "shards":
                    assert len(read_shard(path)) > 0
                elif path.suffix == ".faiss":
                    faiss.read_index(str(path))
                elif path.suffix == ".npy":
                    np.load(path, allow_pickle=False)
                elif path.suffix == ".json":
                    assert json.loads(path.read_text())["key"]
                elif path.suffix == ".onnx":
                    onnx.load(str(path))
            except Exception:  # noqa: BLE001 - any parse failure is a torn file
                bad.append(path.relative_to(root).as_posix())
    return bad


def classify(root: Path, fx: dict, had_manifest: bool) -> tuple[str, int]:
    """What a kill left: (verified, torn-commit or no-manifest, number of pending files), else
    CrashFailure."""
    manifest, envelope = (root / "Manifest.json").exists(), (root / "Manifest.json.dsse").exists()
    if not manifest and not envelope:
        if had_manifest:
            raise CrashFailure(f"{root}: the committed Manifest disappeared")
        return "no-manifest", 0
    try:
        result = verify_cache(root, trusted=fx["trusted"], now=dt.datetime.now(dt.timezone.utc),
                              state_path=None)
        return "verified", result.pending
    except VerifyError as exc:
        if exc.reason == "envelope-mismatch" or (exc.reason == "missing-manifest" and envelope):
            return "torn-commit", 0
        # signature, payload, rollback or expiry: the commit itself
        if exc.reason not in FILE_REASONS:
            raise CrashFailure(f"{root}: the committed Manifest does not verify: "
                               f"{exc.reason}: {exc}") from None
    # Signature, payload and expiry passed: every file that differs must be the operator's own
    # change of an input (check_kill compares the inputs to before the build).
    differ, pending = differing_files(root)
    wrong = [rel for rel in differ if rel.split("/")[0] not in ("tiles", "models")]
    if wrong:
        raise CrashFailure(f"{root}: files differ from the committed Manifest: {wrong[:3]}")
    return "verified", pending


def differing_files(root: Path) -> tuple[list[str], int]:
    """(paths listed with other bytes or missing, and unlisted files verify would refuse;
    the number of unlisted files it accepts as pending)."""
    from c10.errors import VerifyError
    from c10.store.layout import CONTROL_DIR, is_control, is_control_dir_file
    from c10.trust.manifest import loads_manifest
    from c10.trust.tilelists import expand_files
    from c10.trust.tree import pending_files

    manifest = loads_manifest((root / "Manifest.json").read_bytes())
    try:  # a tile list that is missing or not its signed bytes differs as a whole
        files = expand_files(root, manifest)
    except VerifyError as exc:
        return [exc.path or "Manifest.json"], 0
    listed = {f["path"]: f["blake3"] for f in files}
    differ = []
    for rel, digest in listed.items():
        path = root / rel
        if not path.is_file() or blake3.blake3(path.read_bytes()).hexdigest() != digest:
            differ.append(rel)
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    unlisted = sorted(rel for rel in present - set(listed) if not is_control(rel))
    # .c10/ holds only names c10 writes there (verify walks it against that allowlist)
    strays = [rel for rel in present if rel.startswith(CONTROL_DIR + "/")
              and not is_control_dir_file(rel[len(CONTROL_DIR) + 1:])]
    pending, refused = pending_files(root, unlisted, manifest)
    return sorted(differ + refused + strays), len(pending)


def check_kill(root: Path, fx: dict, inputs: dict, had_manifest: bool) -> tuple[str, int]:
    if inputs_of(root) != inputs:
        raise CrashFailure(f"{root}: an input file changed")
    torn = torn_files(root)
    if torn:
        raise CrashFailure(f"{root}: torn derived files {torn[:3]}")
    return classify(root, fx, had_manifest)


def check_converged(root: Path, fx: dict, reference: dict) -> None:
    verify_cache(root, trusted=fx["trusted"], now=dt.datetime.now(dt.timezone.utc), state_path=None)
    left = temp_files(root)
    if left:
        raise CrashFailure(f"{root}: temp files left after a completed build: {left[:3]}")
    got = outputs(root)
    if got != reference:
        diff = sorted(k for k in set(got) | set(reference) if got.get(k) != reference.get(k))
        raise CrashFailure(f"{root}: shards/index differ from a clean build's: {diff[:5]}")


# ---------------------------------------------------------------- the run

def run(kills: int, seed: int, work: Path, per_episode: tuple[int, int] = (1, 3),
        fx: dict | None = None, pack_kills: int = 0) -> dict:
    """The bench; `fx` (as make_inputs returns) reuses a key, tiles and model made elsewhere;
    `pack_kills` kills of `c10 pack` of the built cache follow the build kills."""
    rng = random.Random(seed)
    started = time.perf_counter()
    fx = fx or make_inputs(work)
    base = new_cache(work / "base", fx)
    cold = timed_build(base)[:2]  # from nothing: state A's clean reference
    refs = {"A": outputs(base), "B": clean_reference(work / "ref-B", fx, "B")}
    set_state(base, fx, "B")
    inc = timed_build(base)[:2]
    check_converged(base, fx, refs["B"])
    stats = {"kills": 0, "failures": 0, "failure_details": [], "outcomes": {}, "stages": {},
             "windows": {}, "roll_forwards": 0, "finished_before_kill": 0,
             "episodes": {"cold": 0, "incremental": 0},
             "converged": 0, "kills_leaving_pending_files": 0}
    # A first attempt's (seconds, seconds until its first task), re-measured as the host's load
    # changes.
    spans = {"cold": [cold], "incremental": [inc]}
    state, n = "B", 0
    while stats["kills"] < kills:
        n += 1
        try:
            state = _episode(rng, work, fx, refs, base, state, n, stats, spans, kills, per_episode)
        except CrashFailure as exc:
            stats["failures"] += 1
            stats["failure_details"].append(str(exc)[:600])
            base = new_cache(work / f"base-{n}", fx)  # start over from a fresh, consistent cache
            set_state(base, fx, state)
            complete_build(base)
    stats.update({"pack_kills": 0, "pack_outcomes": {}, "pack_stages": {}, "pack_windows": {},
                  "pack_finished_before_kill": 0, "pack_converged": 0,
                  "pack_kills_leaving_partial": 0, "pack_leftovers_removed": 0})
    if pack_kills:
        run_pack_kills(rng, work, fx, base, stats, pack_kills, per_episode)
    stats["kills_total"] = stats["kills"] + stats["pack_kills"]
    stats["build_s"] = {k: [round(statistics.median(t[i] for t in v[-5:]), 2) for i in (0, 1)]
                        for k, v in spans.items()}
    stats["time_s"] = round(time.perf_counter() - started, 1)
    return stats


def _episode(rng, work, fx, refs, base, state, n, stats, spans, target, per_episode) -> str:
    kind = "cold" if rng.random() < 0.4 else "incremental"
    if kind == "cold":
        state = rng.choice("AB")
        root = new_cache(work / f"cold-{n}", fx)
        had_manifest = False
    else:
        state = "A" if state == "B" else "B"
        root, had_manifest = base, True
    set_state(root, fx, state)
    stats["episodes"][kind] += 1
    inputs = inputs_of(root)
    if stats["episodes"][kind] % 8 == 0:  # re-measure an uncut first attempt as the load changes
        spans[kind].append(_measure(kind, work / f"measure-{n}", fx, state, base))
    for _ in range(rng.randint(*per_episode)):
        if stats["kills"] >= target:
            break
        total, startup = (statistics.median(t[i] for t in spans[kind][-5:]) for i in (0, 1))
        # Every other kill falls anywhere, the rest after the interpreter and graph have loaded.
        window = "whole" if stats["kills"] % 2 == 0 else "tasks"
        delay = rng.uniform(0.0 if window == "whole" else startup, total)
        killed, out, _ = killed_build(root, delay)
        stats["roll_forwards"] += ROLLED in out
        if not killed:
            stats["finished_before_kill"] += 1
            continue
        stats["kills"] += 1
        stats["windows"][window] = stats["windows"].get(window, 0) + 1
        stage = stage_at_kill(out)
        stats["stages"][stage] = stats["stages"].get(stage, 0) + 1
        outcome, pending = check_kill(root, fx, inputs, had_manifest)
        stats["outcomes"][outcome] = stats["outcomes"].get(outcome, 0) + 1
        stats["kills_leaving_pending_files"] += pending > 0
        had_manifest = had_manifest or outcome != "no-manifest"
    _, out = complete_build(root)
    stats["roll_forwards"] += ROLLED in out
    check_converged(root, fx, refs[state])
    stats["converged"] += 1
    if kind == "cold":
        shutil.rmtree(root)
    return state


def _measure(kind: str, scratch: Path, fx: dict, state: str, base: Path) -> tuple[float, float]:
    """(seconds, seconds to the first task) of an uncut first attempt of this kind (base is left as
    it was)."""
    if kind == "cold":
        root = new_cache(scratch, fx)
        set_state(root, fx, state)
        span = timed_build(root)[:2]
        shutil.rmtree(root)
        return span
    span = timed_build(base)[:2]  # base already holds the episode's new state
    set_state(base, fx, "A" if state == "B" else "B")
    complete_build(base)
    set_state(base, fx, state)
    return span


# ---------------------------------------------------------------- kills during c10 pack

def pack_process(root: Path, out: Path, fx: dict, work: Path) -> subprocess.Popen:
    """`c10 pack ROOT OUT` as its own process group (its state file only read, in the work dir)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.Popen([C10, "pack", str(root), str(out), "--trusted-keys", str(fx["pub"]),
                             "--state", str(work / "pack-state.json")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def timed_pack(root: Path, out: Path, fx: dict, work: Path) -> tuple[float, float, str]:
    """A pack run to completion: (seconds, seconds until it said it is copying, output)."""
    started, first = time.perf_counter(), None
    proc = pack_process(root, out, fx, work)
    lines = []
    for line in proc.stdout:
        if first is None and "copying" in line:
            first = time.perf_counter() - started
        lines.append(line)
    proc.wait()
    text = "".join(lines)
    if proc.returncode != 0:
        raise CrashFailure(f"pack: {out}: the re-run failed (exit {proc.returncode}): "
                           f"{text[-1500:]}")
    total = time.perf_counter() - started
    return total, first if first is not None else total, text


def killed_pack(root: Path, out: Path, fx: dict, work: Path, delay: float) -> tuple[bool, str]:
    proc = pack_process(root, out, fx, work)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return True, proc.communicate()[0]
    return False, proc.communicate()[0]


def partials(out: Path) -> list[str]:
    """Temporary directories of packs of `out` beside it."""
    from c10.tools.pack import partial_prefix

    prefix = partial_prefix(out)
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(prefix))


def check_image(out: Path, fx: dict, fingerprints: dict) -> str:
    """'absent', or 'image' when OUT verifies as `c10 verify OUT --airborne` would; else
    CrashFailure."""
    if not os.path.lexists(out):
        return "absent"
    try:
        verify_cache(out, trusted=fx["trusted"], now=dt.datetime.now(dt.timezone.utc),
                     state_path=None, airborne_fingerprints=fingerprints)
    except VerifyError as exc:
        raise CrashFailure(f"pack: {out} exists but does not verify --airborne: {exc.reason}: "
                           f"{exc}") from None
    return "image"


def run_pack_kills(rng, work: Path, fx: dict, base: Path, stats: dict, kills: int,
                   per_episode: tuple[int, int]) -> None:
    from c10.features.backends import host_fingerprints

    fingerprints = host_fingerprints()  # this host's, as `c10 verify --airborne` probes them
    images = work / "images"
    images.mkdir(exist_ok=True)
    measure = images / "measure"
    spans = [timed_pack(base, measure, fx, work)[:2]]
    shutil.rmtree(measure)
    source = digests(base, IMAGE_TOPS, PAIR + ("c10.toml",))
    n = 0
    while stats["pack_kills"] < kills:
        n += 1
        try:
            _pack_episode(rng, work, fx, base, stats, kills, per_episode, images / f"image-{n}",
                          spans, source, fingerprints)
        except CrashFailure as exc:
            stats["failures"] += 1
            stats["failure_details"].append(str(exc)[:600])
        if n % 8 == 0:
            spans.append(timed_pack(base, measure, fx, work)[:2])
            shutil.rmtree(measure)
    stats["pack_s"] = [round(statistics.median(t[i] for t in spans[-5:]), 3) for i in (0, 1)]


def _pack_episode(rng, work, fx, base, stats, target, per_episode, out, spans, source,
                  fingerprints) -> None:
    for _ in range(rng.randint(*per_episode)):
        if stats["pack_kills"] >= target or os.path.lexists(out):
            break  # (a kill after the rename: the image is complete, nothing more to cut)
        total, startup = (statistics.median(t[i] for t in spans[-5:]) for i in (0, 1))
        window = "whole" if stats["pack_kills"] % 2 == 0 else "tasks"
        delay = rng.uniform(0.0 if window == "whole" else startup, total)
        killed, text = killed_pack(base, out, fx, work, delay)
        if not killed:
            stats["pack_finished_before_kill"] += 1
            if check_image(out, fx, fingerprints) != "image":
                raise CrashFailure(f"pack: {out}: an uncut pack left no image: {text[-800:]}")
            continue
        stats["pack_kills"] += 1
        stats["pack_windows"][window] = stats["pack_windows"].get(window, 0) + 1
        stage = ("startup" if "copying" not in text else "copy-verify-rename"
                 if "wrote" not in text else "after-rename")
        stats["pack_stages"][stage] = stats["pack_stages"].get(stage, 0) + 1
        if digests(base, IMAGE_TOPS, PAIR + ("c10.toml",)) != source:
            raise CrashFailure(f"pack: a killed pack changed the cache {base}")
        outcome = check_image(out, fx, fingerprints)
        stats["pack_outcomes"][outcome] = stats["pack_outcomes"].get(outcome, 0) + 1
        stats["pack_kills_leaving_partial"] += bool(partials(out))
    rerun = out if not os.path.lexists(out) else out.with_name(out.name + "-rerun")
    left = partials(rerun)
    _, _, text = timed_pack(base, rerun, fx, work)
    if check_image(rerun, fx, fingerprints) != "image":
        raise CrashFailure(f"pack: the re-run left no image at {rerun}: {text[-800:]}")
    if partials(rerun):
        raise CrashFailure(f"pack: temporary dirs left beside {rerun}: {partials(rerun)}")
    stats["pack_leftovers_removed"] += len(left)
    _check_refused(rerun, fx)
    stats["pack_converged"] += 1
    for image in (out, rerun):
        if os.path.lexists(image):
            shutil.rmtree(image)


def _check_refused(out: Path, fx: dict) -> None:
    """A pack to an existing OUT is refused and leaves it as it was."""
    from c10.tools.pack import PackError, pack

    before = digests(out, IMAGE_TOPS, PAIR)
    try:
        pack(out, out, trusted=fx["trusted"], now=dt.datetime.now(dt.timezone.utc))
    except PackError:
        pass
    else:
        raise CrashFailure(f"pack: a pack over the existing {out} was not refused")
    if digests(out, IMAGE_TOPS, PAIR) != before:
        raise CrashFailure(f"pack: a refused pack changed {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--kills", type=int, default=300)
    parser.add_argument("--pack-kills", type=int, default=100,
                        help="SIGKILLs of `c10 pack` of the built cache after the build kills")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, help="default: a temp dir, removed afterwards")
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    args = parser.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="c10-crash-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        stats = run(args.kills, args.seed, work, pack_kills=args.pack_kills)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"bench": "crash", "seed": args.seed, **stats}, indent=1))
    return 0 if stats["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
