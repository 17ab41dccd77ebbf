"""Where c10 meets doit: actions that fail in one clean line, uptodate callables doit reads fast."""
from __future__ import annotations

import functools
import inspect
from typing import Callable

from doit.exceptions import TaskFailed
from doit.tools import config_changed

from c10.errors import C10Error
from c10.rules import session


def action(fn: Callable) -> Callable:
    """Adapt a domain call to doit: a C10Error becomes a TaskFailed that prints one clean line
    (and is the run's error, for the BuildReport and the Python API)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            result = fn(*args, **kwargs)
        except C10Error as exc:
            session.current().error = exc
            return TaskFailed(f"{type(exc).__name__}: {exc}")
        return result if isinstance(result, (dict, str, TaskFailed)) else None

    return run


def presigned(check: Callable) -> Callable:
    """`check` with its signature attached: doit calls inspect.signature() on every uptodate
    callable of every task on every run (for its `task`/`values` arguments); inspect answers a set
    __signature__ at once (PEP 362)."""
    check.__signature__ = inspect.signature(check)
    return check


_CONFIG_CHANGED = inspect.signature(config_changed(""))


def changed(config) -> config_changed:
    """doit's config_changed(config), presigned."""
    check = config_changed(config)
    check.__signature__ = _CONFIG_CHANGED
    return check


def plan_or_none():
    """The run's plan, or None when the request is invalid (build_cache then reports why)."""
    try:
        return session.current().plan()
    except C10Error:
        return None
