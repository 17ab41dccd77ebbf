"""What `doit build_cache` would run and why, from doit's own status reasons; writes nothing."""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from doit import loader
from doit.control import TaskControl
from doit.dependency import Dependency

from c10.plan import Plan
from c10.rules.coverage import verdict
from c10.store.layout import MANIFEST_NAME


class ReadOnlyDB:
    """doit's sqlite3 dependency DB opened read-only (a DB that does not exist reads as empty)."""

    def __init__(self, name, codec, *, module_name=None):
        self.name, self.codec, self._cache = name, codec, {}
        self._conn = None
        if os.path.isfile(name):
            self._conn = sqlite3.connect(f"file:{Path(name).resolve()}?mode=ro", uri=True,
                                         timeout=10)

    def _data(self, task_id: str) -> dict:
        if task_id not in self._cache:
            row = None
            if self._conn is not None:
                try:
                    row = self._conn.execute("select task_data from doit where task_id=?",
                                             (task_id,)).fetchone()
                except sqlite3.DatabaseError:
                    # unreadable: everything reads as never built, as doit would rebuild it
                    row = None
            self._cache[task_id] = self.codec.decode(row[0]) if row and row[0] else {}
        return self._cache[task_id]

    def get(self, task_id, dependency):
        return self._data(task_id).get(dependency)

    def set(self, task_id, dependency, value):
        self._data(task_id)[dependency] = value  # in memory only

    def in_(self, task_id):
        return bool(self._data(task_id))

    def remove(self, task_id):
        self._cache[task_id] = {}

    def remove_all(self):
        self._cache.clear()

    def dump(self):
        if self._conn is not None:
            self._conn.close()


def task_states(namespace: dict, dep_file: str, checker_cls,
                selected=("build_cache",)) -> list[dict]:
    """Each task with actions that `selected` reaches, in run order: status and doit's reasons."""
    tasks = loader.load_tasks(namespace, allow_delayed=False)
    control = TaskControl(tasks)
    control.process(list(selected))
    dep = Dependency(ReadOnlyDB, dep_file, checker_cls=checker_cls)
    try:
        out = []
        for name in _run_order(control.tasks, selected):
            task = control.tasks[name]
            if not task.actions:
                continue
            recorded = dep._in(name)
            status = dep.get_status(task, control.tasks, get_log=True)
            out.append({"name": name, "doc": task.doc or "", "status": status.status,
                        "recorded": recorded,
                        "reasons": _plain(status.reasons), "targets": list(task.targets),
                        "file_dep": sorted(task.file_dep)})
        return out
    finally:
        dep.close()


def _run_order(tasks: dict, selected) -> list[str]:
    """Depth-first post-order over task_dep (doit's own order for a serial run)."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        for dep in tasks[name].task_dep:
            visit(dep)
        order.append(name)

    for name in selected:
        visit(name)
    return order


def _plain(reasons: dict) -> dict:
    """doit's reasons as JSON values; an uptodate callable becomes its name."""
    out = {}
    for key, value in reasons.items():
        if key == "uptodate_false":
            value = [_callable_name(utd) for utd, _, _ in value]
        elif isinstance(value, tuple):
            value = list(value)
        if value:
            out[key] = value
    return out


def _callable_name(utd) -> str:
    return getattr(utd, "__name__", None) or type(utd).__name__


def area_facts(plan: Plan) -> dict:
    """Tiles expected/present, and what the coverage gate would remove or refuse (read-only)."""
    area, counts, found = plan.config.area, plan.tile_counts(), verdict(plan)
    return {"root": str(plan.root), "bbox": list(area.bbox), "zooms": list(area.zooms),
            "require_complete": area.require_complete, "tiles_expected": counts.expected,
            "tiles_present": counts.present, "tiles_missing": counts.missing,
            "tiles_out_of_scope": counts.out_of_scope, "dead": found.dead, "orphans": found.orphans,
            "manifest": (plan.root / MANIFEST_NAME).is_file()}
