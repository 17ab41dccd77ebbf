"""The namespace of c10's build graph: doit's config and every task generator, in run order."""
from __future__ import annotations

from c10.rules.adapters import action, plan_or_none
from c10.rules.checker import Blake3Checker
from c10.rules.coverage import task_coverage
from c10.rules.engines import task_engines
from c10.rules.index import task_index
from c10.rules.manifest import task_manifest
from c10.rules.prune import task_prune
from c10.rules.reporter import C10Reporter
from c10.rules.shards import task_shards
from c10.store.layout import DEP_FILE

# sqlite3: `doit list`/`info` can read it during a build (gdbm locks them out) and a kill
# loses at most the run's updates (json loses concurrent ones); see DESIGN.md.
DOIT_CONFIG = {
    "default_tasks": ["build_cache"],
    "backend": "sqlite3",
    "dep_file": DEP_FILE,
    "check_file_uptodate": Blake3Checker,
    "reporter": C10Reporter,  # doit's console output, then the BuildReport (.c10/report.json)
    # `doit -n N` runs tasks in threads of this one process: the build lock and the operator key
    # are held once per build (forked workers would each try to take them).
    "par_type": "thread",
}


def task_build_cache():
    """Build the whole takeoff cache (the default task)."""
    if plan_or_none() is None:
        return {"actions": [action(_load_plan)], "verbosity": 2}  # fails with the request's error
    return {"actions": None, "task_dep": ["manifest"]}


def _load_plan() -> None:
    from c10.rules import session

    session.current().plan()


TASKS = {f.__name__: f for f in (task_engines, task_shards, task_index, task_coverage,
                                 task_manifest,
                                 task_build_cache, task_prune)}


def namespace() -> dict:
    """What doit loads tasks from: DOIT_CONFIG and every task_* generator."""
    return {"DOIT_CONFIG": dict(DOIT_CONFIG), **TASKS}
