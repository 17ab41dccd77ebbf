"""The task generators: one dict per artifact, and uptodate callables doit can call without
inspecting them."""
from __future__ import annotations

import inspect

from c10.rules import session
from c10.rules.dodo import TASKS


def test_every_uptodate_callable_is_presigned(cache):
    """doit calls inspect.signature() on each uptodate callable of each task on every run: a set
    __signature__ (the real one) answers at once instead of ~20 µs of introspection per call."""
    session.begin(cache)
    try:
        dicts = [d for task in TASKS.values()
                 for d in (lambda out: out if inspect.isgenerator(out) else [out])(task())]
    finally:
        session.end(save=False)
    checks = [u for d in dicts for u in d.get("uptodate", ()) if callable(u)]
    assert any(d.get("name", "").startswith("global/") for d in dicts) and checks
    for check in checks:
        assert "__signature__" in vars(check), check
        assert list(inspect.signature(check).parameters)[:2] == ["task", "values"]
