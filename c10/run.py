"""Run the cache's doit graph in this process (doit's DoitMain with a module task loader)."""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator, Sequence

from c10.lock import require_cache_root


@contextlib.contextmanager
def _in_dir(root: Path) -> Iterator[None]:
    """doit resolves every path against the cwd, as when it runs the cache's own dodo.py."""
    before = os.getcwd()
    os.chdir(root)
    try:
        yield
    finally:
        os.chdir(before)


def run_build(root: Path, doit_args: Sequence[str] = ("build_cache",)) -> int:
    """`doit ARGS` in `root` through the same graph as its dodo.py; returns doit's exit code."""
    from doit.cmd_base import ModuleTaskLoader
    from doit.doit_cmd import DoitMain

    from rules import session

    root = require_cache_root(root)
    session.claim(root)  # before the chdir: another thread's build keeps its cwd
    try:
        (root / ".c10").mkdir(exist_ok=True)
        with _in_dir(root):
            import rules
            import rules.tasks as tasks
            from rules import depdb, graph

            depdb.recover(rules.DEP_FILE)
            graph.reset()
            session.new_run()
            namespace = {n: getattr(tasks, n) for n in dir(tasks) if n.startswith("task_")}
            # doit binds its default output stream at import; bind the current one instead
            namespace["DOIT_CONFIG"] = {**rules.DOIT_CONFIG, "outfile": sys.stdout}
            streams = sys.stdout, sys.stderr
            try:
                return DoitMain(ModuleTaskLoader(namespace)).run(list(doit_args))
            finally:
                # doit's actions swap sys.stdout/err to capture output, unlocked: with `-n N`
                # threads one capture can outlive the run and silence the next in-process build
                sys.stdout, sys.stderr = streams
                session.end()
                graph.reset()
    finally:
        session.end()  # also when the build never started (a no-op after the one above)


def build_status(root: Path) -> dict:
    """What `doit build_cache` in `root` would run and why, without the lock and without writing."""
    root = require_cache_root(root)
    import rules
    import rules.tasks as tasks
    from rules import graph, session, status

    with _in_dir(root):
        graph.reset()
        session.new_run()
        try:
            loaded = graph.load_graph(root)  # an invalid request is the answer: raise it
            namespace = {n: getattr(tasks, n) for n in dir(tasks) if n.startswith("task_")}
            states = status.task_states(namespace, rules.DEP_FILE, rules.DOIT_CONFIG["check_file_uptodate"])
            return {**status.area_facts(loaded), "tasks": states}
        finally:
            graph.reset(save=False)  # hashes computed while checking stay unsaved: nothing is written
