"""One build per process: the lock and the operator key, taken by the first action that needs them."""
from __future__ import annotations

import functools
import os
import threading
import time
from pathlib import Path
from typing import Callable

from doit.exceptions import TaskFailed

from c10.errors import BuildLockHeldError, C10Error
from c10.lock import BuildLock

_state: dict = {"lock": None, "key": None, "error": None, "report": None, "start": None, "thread": None}
_mutex = threading.Lock()


def claim(root: Path) -> None:
    """Make this thread the process's one builder until `end()` (doit's state, the cwd and this
    session are per process): a build another thread starts meanwhile fails at once, as a second
    process would. Called where builds start (run_build, the API), not by actions: `doit -n N`
    runs those in worker threads of the one build."""
    with _mutex:
        me = threading.get_ident()
        if _state["thread"] not in (None, me):
            raise BuildLockHeldError(f"{root}: another build is running in this process (pid "
                                     f"{os.getpid()}, another thread); one process builds one cache at "
                                     "a time: wait for it to finish, then re-run")
        _state["thread"] = me


def ensure_locked(root: Path) -> None:
    """Take the build lock once per process (a second build fails here, before writing anything)."""
    with _mutex:
        if _state["lock"] is None:
            lock = BuildLock(root)
            lock.acquire()
            _state["lock"] = lock


def signing_key(loader: Callable[[], object]):
    """The operator key, loaded once per build by `loader` (the file is opened exactly once)."""
    with _mutex:
        if _state["key"] is None:
            _state["key"] = loader()
        return _state["key"]


def drop_key() -> None:
    """Forget the key as soon as the Manifest is signed (seed CP-INV-7)."""
    _state["key"] = None


def last_error() -> C10Error | None:
    return _state["error"]


def end() -> None:
    """Release the lock and forget the key (the in-process API calls this after each build)."""
    with _mutex:
        if _state["thread"] not in (None, threading.get_ident()):
            return  # a refused thread's cleanup: the running build keeps its lock and key
        if _state["lock"] is not None:
            _state["lock"].release()
        _state.update(lock=None, key=None, thread=None)


def clear_error() -> None:
    _state["error"] = None


def new_run() -> None:
    """Forget the previous in-process run's error, report and start time."""
    _state.update(error=None, report=None, start=None)


def mark_start() -> None:
    """The build's clock starts when its graph first loads (the report's elapsed_s and load stage)."""
    if _state["start"] is None:
        _state["start"] = time.perf_counter()


def elapsed() -> float:
    return 0.0 if _state["start"] is None else time.perf_counter() - _state["start"]


def set_report(report) -> None:
    _state["report"] = report


def last_report():
    """The BuildReport of this process's last `build_cache` run (the Python API returns it)."""
    return _state["report"]


def action(fn: Callable) -> Callable:
    """Adapt a domain call to doit: a C10Error becomes a TaskFailed that prints one clean line."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            result = fn(*args, **kwargs)
        except C10Error as exc:
            _state["error"] = exc
            return TaskFailed(f"{type(exc).__name__}: {exc}")
        return result if isinstance(result, (dict, str, TaskFailed)) else None

    return run
