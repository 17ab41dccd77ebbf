"""The task generators: one dict per artifact, and uptodate callables doit can call without inspecting them."""
from __future__ import annotations

import inspect

from rules import graph, tasks


def test_every_uptodate_callable_is_presigned(cache, monkeypatch):
    """doit calls inspect.signature() on each uptodate callable of each task on every run: a set
    __signature__ (the real one) answers at once instead of ~20 µs of introspection per call."""
    monkeypatch.chdir(cache)
    graph.reset()
    try:
        dicts = [d for name in dir(tasks) if name.startswith("task_")
                 for d in (lambda out: out if inspect.isgenerator(out) else [out])(getattr(tasks, name)())]
    finally:
        graph.reset(save=False)
    checks = [u for d in dicts for u in d.get("uptodate", ()) if callable(u)]
    assert any(d.get("name", "").startswith("global/") for d in dicts) and checks
    for check in checks:
        assert "__signature__" in vars(check), check
        assert list(inspect.signature(check).parameters)[:2] == ["task", "values"]
