"""`doit ignore` of a task the Manifest needs fails the build instead of leaving the Manifest stale.

doit's Ignore command marks a task in its dependency DB (`Dependency.ignore`: the key "ignore:",
value "1", in the task's record; `doit forget TASK` deletes the record and the mark with it). The
runner then skips the task and, through task_dep, everything after it: the coverage gate and the
manifest too, so a run would exit 0 over tiles the Manifest no longer matches. The loader asks the
DB for every task the selected ones need before anything runs; when one is ignored, each selected
task that reaches the manifest is replaced by one that only waits for a failing gate, so the run
fails before any task writes and says what to forget.
"""
from __future__ import annotations

import fnmatch
from pathlib import Path

from doit.task import Task

from c10.errors import BuildStepError
from c10.rules.adapters import action

GATE = "ignored"  # the failing task (no task of the graph is named so)
MANIFEST = "manifest"


def guard(tasks: list[Task], selected, dep, root: Path) -> list[Task]:
    """`tasks` unchanged, or with the run refused when doit's DB (`dep`) marks a task ignored that
    a selected task needs for the Manifest."""
    by_name = {t.name: t for t in tasks}
    reaching = [name for name in _resolve(by_name, selected or ())
                if MANIFEST in _closure(by_name, [name])]
    if not reaching:
        return tasks
    ignored = [name for name in _closure(by_name, [MANIFEST, *reaching])
               if dep.status_is_ignore(by_name[name])]
    if not ignored:
        return tasks
    error = ignored_error(root, by_name, ignored)
    replaced = {name: Task(name, None, task_dep=[GATE], targets=list(by_name[name].targets),
                           doc=by_name[name].doc) for name in reaching}
    gate = Task(GATE, [(action(_refuse), [error])], verbosity=2,
                doc="fails: a task the Manifest needs is ignored (`doit ignore`)")
    return [replaced.get(t.name, t) for t in tasks] + [gate]


def ignored_error(root: Path, by_name: dict[str, Task], ignored: list[str]) -> BuildStepError:
    """What is ignored, and the `doit forget` that clears it (a group's forget covers its
    subtasks)."""
    marked = set(ignored)
    tops = sorted(n for n in marked if by_name[n].subtask_of not in marked)
    shown = ", ".join(tops[:5]) + (f" and {len(tops) - 5} more" if len(tops) > 5 else "")
    forget = " ".join(tops[:10]) + (" ..." if len(tops) > 10 else "")
    it = "it" if len(tops) == 1 else "them"
    return BuildStepError(f"{root}: doit's DB marks {shown} as ignored (`doit ignore`), and the "
                          f"Manifest needs {it}: the build would skip {it} and leave the Manifest "
                          "stale, so nothing was built",
                          f"run `doit forget {forget}` to clear the mark")


def _refuse(error: BuildStepError) -> None:
    raise error


def _resolve(by_name: dict[str, Task], selected) -> list[str]:
    """The task names a run's selection means: names, `pattern*`, targets (task options and their
    values name nothing)."""
    names: list[str] = []
    targets = None
    for sel in selected:
        if sel in by_name:
            names.append(sel)
        elif "*" in sel:
            names += fnmatch.filter(by_name, sel)
        else:
            if targets is None:
                targets = {t: task.name for task in by_name.values() for t in task.targets}
            if sel in targets:
                names.append(targets[sel])
    return names


def _closure(by_name: dict[str, Task], start: list[str]) -> list[str]:
    """`start` and every task they reach through task_dep and setup (doit's explicit edges: every
    stage names its predecessors' groups, so a file_dep's implicit edge adds no task)."""
    seen: dict[str, None] = {}
    todo = [n for n in start if n in by_name]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen[name] = None
        task = by_name[name]
        todo += [n for n in (*task.task_dep, *task.setup_tasks) if n in by_name and n not in seen]
    return list(seen)
