"""The build lock across processes (seed CP-INV-4, CP-TC-5): fast refusal naming the holder, free
on kill."""
from __future__ import annotations

import datetime as dt
import errno
import os
import signal
import subprocess
import sys
import time

import pytest

from c10.errors import BuildLockHeldError, ConfigError, StorageError
from c10.rules.driver import run_build
from c10.store.lock import BuildLock, filesystem_type, refuse_network_fs

# A process that holds the lock as a running build does, until killed.
HOLD = ("import sys, time\nfrom c10.store.lock import BuildLock\n"
        "lock = BuildLock(sys.argv[1])\nlock.acquire()\n"
        "print('held', flush=True)\ntime.sleep(120)\n")


@pytest.fixture
def holder(cache):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(cache)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _doit(cache, *args) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return subprocess.Popen([sys.executable, "-m", "doit", *args], cwd=cache, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_second_build_fails_at_once_naming_the_holder(cache, holder, capsys):
    started = time.perf_counter()
    code = run_build(cache)  # the Python API's path: the same graph in-process
    api_s = time.perf_counter() - started
    out = capsys.readouterr().out
    assert (code != 0 and "BuildLockHeldError" in out and f"pid {holder.pid} on " in out
            and "started 20" in out)
    started = time.perf_counter()
    proc = _doit(cache, "build_cache")
    out, _ = proc.communicate()
    cli_s = time.perf_counter() - started
    assert proc.returncode != 0 and "BuildLockHeldError" in out and f"pid {holder.pid} on " in out
    assert "Traceback" not in out
    print(f"refused in {api_s:.2f} s in-process, {cli_s:.2f} s as `doit build_cache` "
          "(with interpreter start)")
    assert api_s < 1.0 and cli_s < 3.0  # the CLI time is mostly Python and imports on a loaded host
    assert not (cache / "engines").exists() and not (cache / "Manifest.json").exists()


def test_list_and_info_work_while_a_build_holds_the_lock(cache, capsys):
    assert run_build(cache) == 0
    capsys.readouterr()
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(cache)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert run_build(cache, ["list", "--all"]) == 0
        shard = next(line.split()[0] for line in capsys.readouterr().out.splitlines()
                     if line.startswith("shards:"))
        assert run_build(cache, ["info", shard]) == 0
        assert "up-to-date" in capsys.readouterr().out
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_holder_frees_the_lock_at_once(cache, holder):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    started = time.perf_counter()
    lock = BuildLock(cache)
    lock.acquire()  # raises BuildLockHeldError if the dead holder's lock survived
    try:
        assert time.perf_counter() - started < 0.5
        assert f"pid {os.getpid()} on " in lock.holder()
    finally:
        lock.release()


def test_two_builds_started_together_exactly_one_runs(cache, operator_key):
    from c10.trust.keys import load_trusted_keys
    from c10.trust.verify import verify_cache

    procs = [_doit(cache, "build_cache") for _ in range(2)]
    outs = [p.communicate()[0] for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(c == 0 for c in codes) == [False, True], outs
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    assert ("BuildLockHeldError" in outs[loser]
            and f"pid {procs[winner].pid} on " in outs[loser]), outs[loser]
    assert "Traceback" not in outs[loser]
    verify_cache(cache, trusted=load_trusted_keys([operator_key[1]]),
                 now=dt.datetime.now(dt.timezone.utc), state_path=None)


def test_a_failed_holder_write_releases_the_lock(cache, monkeypatch):
    real = os.replace

    def failing(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(StorageError, match="lock-holder.json: cannot write it .*free space"):
        BuildLock(cache).acquire()
    monkeypatch.setattr(os, "replace", real)
    with BuildLock(cache) as lock:  # a lock kept by the failed attempt would refuse this
        assert lock.held


def test_same_process_second_lock_is_refused(cache):
    with BuildLock(cache):
        with pytest.raises(BuildLockHeldError, match=f"pid {os.getpid()}"):
            BuildLock(cache).acquire()


def test_network_filesystem_is_refused(tmp_path, monkeypatch):
    mounts = f"/dev/sda1 / ext4 rw 0 0\nserver:/export {tmp_path} nfs4 rw 0 0\n"
    assert filesystem_type(tmp_path / "cache", mounts) == "nfs4"
    with pytest.raises(ConfigError, match=r"network file system \(nfs4\).*local disk"):
        refuse_network_fs(tmp_path, mounts)
    assert refuse_network_fs(tmp_path, "/dev/sda1 / ext4 rw 0 0\n") == "ext4"
    monkeypatch.setenv("C10_ALLOW_NETWORK_FS", "1")
    assert refuse_network_fs(tmp_path, mounts) == "nfs4"


def test_a_second_build_in_another_thread_of_the_process_is_refused(cache, capsys):
    import threading

    from c10.rules import session

    results = {}
    first = threading.Thread(target=lambda: results.setdefault("first", run_build(cache)))
    first.start()
    deadline = time.monotonic() + 30
    while session._owner is None and first.is_alive() and time.monotonic() < deadline:
        time.sleep(0.001)
    with pytest.raises(BuildLockHeldError,
                       match=f"another build is running in this process \\(pid {os.getpid()}"):
        run_build(cache)
    first.join()
    assert results["first"] == 0, capsys.readouterr().out
    assert (cache / "Manifest.json").is_file()
    assert session._owner is None and session.active() is None
