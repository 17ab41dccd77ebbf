"""doit's own commands in a cache: ignore, auto, -P process, list outside a cache, clean, dumpdb.
Real doit runs: the console script in the cache, or the in-process driver."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_cache, plan_of, rewrite

from c10.errors import BuildLockHeldError
from c10.rules import session
from c10.rules.driver import run_build
from c10.store.lock import BuildLock
from c10.tools.project import DODO_PY, DOIT_CFG

BIN = Path(sys.executable).parent
DOIT, C10 = str(BIN / "doit"), str(BIN / "c10")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE")}
    return env | {"C10_NO_PROGRESS": "1"}


def doit(cache: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([DOIT, *args], cwd=cache, env=_env(), capture_output=True, text=True,
                          timeout=300)


def verify(cache: Path, pub: Path) -> subprocess.CompletedProcess:
    return subprocess.run([C10, "verify", str(cache), "--trusted-keys", str(pub)], env=_env(),
                          capture_output=True, text=True, timeout=300)


def files(root: Path) -> dict[str, bytes]:
    """Every file outside the control dir, with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".c10" not in p.relative_to(root).parts}


def lock_is_free(cache: Path) -> bool:
    lock = BuildLock(cache)
    try:
        lock.acquire()
    except BuildLockHeldError:
        return False
    lock.release()
    return True


@pytest.fixture(scope="module")
def built(tmp_path_factory, inputs, operator_key) -> Path:
    """One built cache for the tests that change nothing in it."""
    root = make_cache(tmp_path_factory.mktemp("doit-commands") / "cache", inputs, operator_key)
    run = doit(root, "build_cache")
    assert run.returncode == 0, run.stdout + run.stderr
    return root


def _shard_task(cache: Path) -> tuple[str, list[Path]]:
    """A shard task's name and its tiles."""
    model = next(iter(plan_of(cache).embedding_plans()))
    rel, tiles = next(iter(model.shards.items()))
    return "shards:" + rel.removeprefix("shards/").removesuffix(".npy"), [cache / t.path
                                                                        for t in tiles]


# --- 1. doit ignore -----------------------------------------------------------------------------

def test_an_ignored_shard_fails_the_build_naming_doit_forget(cache, operator_key):
    assert doit(cache, "build_cache").returncode == 0
    name, tiles = _shard_task(cache)
    manifest = (cache / "Manifest.json").read_bytes()
    assert f"ignoring {name}" in doit(cache, "ignore", name).stdout
    rewrite(tiles[0], tiles[-1].read_bytes())  # an edited tile of the ignored shard

    run = doit(cache, "build_cache")
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert (f"BuildStepError: {cache}: doit's DB marks {name} as ignored (`doit ignore`)" in out
            and f"run `doit forget {name}` to clear the mark" in out), out
    assert "c10 build report: FAILURE" in out and "Traceback" not in out
    assert json.loads((cache / ".c10/report.json").read_text())["outcome"] == "failure"
    assert (cache / "Manifest.json").read_bytes() == manifest  # nothing ran, nothing was signed
    assert doit(cache, "-n", "2", "build_cache").returncode == 1  # threads: the same refusal

    assert f"forgetting {name}" in doit(cache, "forget", name).stdout
    run = doit(cache, "build_cache")
    assert run.returncode == 0 and f".  {name}" in run.stdout, run.stdout + run.stderr
    assert verify(cache, operator_key[1]).returncode == 0


@pytest.mark.parametrize("ignored", ["build_cache", "manifest", "coverage", "shards"])
def test_any_ignored_task_the_manifest_needs_fails_in_process(cache, capsys, ignored):
    """The in-process driver (`c10 build`, the Python API) loads through the same loader; doit
    skips an ignored task's dependents (and the task itself, build_cache included) but never the
    gate it depends on."""
    assert doit(cache, "ignore", ignored).returncode == 0
    code = run_build(cache, ["build_cache"])
    out = capsys.readouterr().out
    assert code == 1 and f"doit's DB marks {ignored} as ignored" in out, out
    assert f"`doit forget {ignored}`" in out
    assert not (cache / "engines").exists() and not (cache / "Manifest.json").exists()
    assert lock_is_free(cache)


def test_an_ignored_task_outside_the_manifest_changes_nothing(built):
    assert doit(built, "ignore", "prune").returncode == 0
    try:
        run = doit(built, "build_cache")
        assert run.returncode == 0 and "ignored" not in run.stdout, run.stdout + run.stderr
        assert "!! prune" in doit(built, "prune").stdout  # doit's own meaning where it is harmless
    finally:
        doit(built, "forget", "prune")


# --- 2. the lock ends with the run --------------------------------------------------------------

def test_the_lock_is_released_when_the_tasks_finish(built, capsys):
    """A process that outlives its run (the Python API reading the report, `doit auto`) holds no
    lock: released at the end of doit's run, before the session ends."""
    build = session.begin(built)
    try:
        build.ensure_locked()  # as the API takes it before the run
        assert run_build(built, ["build_cache"]) == 0
        assert build.report is not None and build.lock is None
        assert lock_is_free(built)
    finally:
        session.end()
    capsys.readouterr()


FORKED = """
import os, sys, time
from c10.store.lock import BuildLock
lock = BuildLock(sys.argv[1])
lock.acquire()
child = os.fork()
if child == 0:
    held = lock.held
    lock.release()  # a child's release must not free its parent's lock
    print("child holds it" if held else "child", flush=True)
    time.sleep(120)
    os._exit(0)
print(child, flush=True)
time.sleep(120)
"""


def test_a_forked_child_never_keeps_the_lock(built):
    proc = subprocess.Popen([sys.executable, "-c", FORKED, str(built)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())
    child = None
    try:
        lines = {proc.stdout.readline().strip(), proc.stdout.readline().strip()}
        pids = [line for line in lines if line.isdigit()]
        if not pids:  # the script failed before its fork: say how
            proc.kill()
            pytest.fail(f"the forking script printed {lines}: {proc.communicate(timeout=30)[1]}")
        child = int(pids[0])
        assert "child" in lines, lines
        assert not lock_is_free(built)  # the child's release left the parent's lock alone
        proc.kill()
        proc.wait()
        os.kill(child, 0)  # the child lives on ...
        assert lock_is_free(built)  # ... without the lock
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if child is not None:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.skipif(importlib.util.find_spec("doit_auto1") is None,
                    reason="doit auto needs the doit-auto1 plugin (pip install doit-auto1)")
def test_doit_auto_holds_no_lock_between_runs_nor_after_a_kill(built, tmp_path):
    log = tmp_path / "auto.log"
    with log.open("w") as out:
        auto = subprocess.Popen([DOIT, "auto", "build_cache"], cwd=built, env=_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "c10 build report" not in log.read_text():
            assert auto.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        deadline = time.monotonic() + 10  # the run's end follows its report
        while not lock_is_free(built):
            assert time.monotonic() < deadline, "the idle watcher holds .c10.lock"
            time.sleep(0.1)
        run = doit(built, "build_cache")  # the symptom: BuildLockHeldError against the watcher
        assert run.returncode == 0, run.stdout + run.stderr
        auto.kill()  # SIGKILL of `doit auto`: its forked watcher lives on
        auto.wait()
        os.killpg(auto.pid, 0)
        assert lock_is_free(built)
    finally:
        try:
            os.killpg(auto.pid, signal.SIGKILL)  # the session this test started
        except ProcessLookupError:
            pass
        auto.wait()


# --- 3. -P process ------------------------------------------------------------------------------

def test_process_workers_are_refused_up_front(cache):
    run = doit(cache, "-n", "2", "-P", "process", "build_cache")
    assert run.returncode == 3, run.stdout + run.stderr
    assert ("c10 runs parallel tasks in threads: use `doit -n N -P thread`" in run.stderr
            and "Traceback" not in run.stderr)
    assert not (cache / "engines").exists() and not (cache / "Manifest.json").exists()
    run = doit(cache, "-n", "2", "-P", "thread", "build_cache")
    assert run.returncode == 0 and (cache / "Manifest.json").is_file(), run.stdout + run.stderr


# --- 4. outside a cache -------------------------------------------------------------------------

@pytest.mark.parametrize("with_cfg", [True, False])
def test_doit_without_c10_toml_says_to_run_c10_init(tmp_path, with_cfg):
    (tmp_path / "dodo.py").write_text(DODO_PY)
    if with_cfg:
        (tmp_path / "doit.cfg").write_text(DOIT_CFG)
    for args in (["list"], ["build_cache"]):
        run = doit(tmp_path, *args)
        out = run.stdout + run.stderr
        assert run.returncode != 0 and "`c10 init .`" in out, out
        assert "Traceback" not in out and "sqlite" not in out
    if with_cfg:
        assert "no c10.toml here, so this is not a c10 cache" in out
        assert sorted(p.name for p in tmp_path.iterdir()) == ["dodo.py", "doit.cfg"]  # no .c10/


# --- 5. clean -----------------------------------------------------------------------------------

def test_clean_is_refused_and_removes_nothing(built, operator_key):
    before = files(built)
    for args in (["clean"], ["clean", "--clean-all"], ["clean", "--dry-run", "shards"]):
        run = doit(built, *args)
        assert run.returncode == 3, run.stdout + run.stderr
        assert ("`doit clean` is not supported in a c10 cache" in run.stderr
                and "`doit prune`" in run.stderr and "remove .c10/" in run.stderr)
    assert files(built) == before
    assert verify(built, operator_key[1]).returncode == 0


def test_removing_the_control_dir_rebuilds_to_the_same_cache(cache, operator_key):
    """What the refusal offers instead: .c10/ holds hints only."""
    assert doit(cache, "build_cache").returncode == 0
    before = files(cache)
    shutil.rmtree(cache / ".c10")
    run = doit(cache, "build_cache")
    assert run.returncode == 0, run.stdout + run.stderr
    def derived(tree: dict[str, bytes]) -> dict[str, bytes]:
        return {k: v for k, v in tree.items() if not k.startswith("Manifest.json")}

    assert derived(files(cache)) == derived(before)  # the same engines, shards and index files
    assert verify(cache, operator_key[1]).returncode == 0


# --- 6. dumpdb ----------------------------------------------------------------------------------

def test_dumpdb_cannot_read_the_sqlite_db_and_c10_status_can(built):
    """doit's dumpdb opens the DB with dbm only (README says so, and names `c10 status`)."""
    assert doit(built, "dumpdb").returncode != 0
    assert doit(built, "dumpdb", "--db-file", ".c10/doit.sqlite").returncode != 0
    run = subprocess.run([C10, "status", str(built), "--json"], env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    tasks = {t["name"]: t for t in json.loads(run.stdout)["tasks"]}
    assert tasks["manifest"]["recorded"] and tasks["manifest"]["status"] == "up-to-date"
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert "`doit dumpdb` reads" in readme and "`c10 status DIR`" in readme
