"""doit's entry into c10: the task loader doit.cfg names, and the in-process driver (DoitMain)."""
from __future__ import annotations

import contextlib
import functools
import os
import sys
from pathlib import Path
from typing import Iterator, Sequence

from doit.cmd_base import NamespaceTaskLoader, opt_cwd
from doit.cmd_clean import Clean
from doit.cmd_run import Run
from doit.exceptions import InvalidCommand, InvalidDodoFile

from c10.rules import ignored, session
from c10.store.layout import CONFIG_NAME, CONTROL_DIR, DEP_FILE
from c10.store.lock import require_cache_root


class CacheLoader(NamespaceTaskLoader):
    """The loader `doit` uses in a cache (doit.cfg: `loader = c10`): c10's own graph, imported from
    the installed package. doit then imports nothing from the cache directory, so a module or
    bytecode planted there (`__pycache__/dodo.*.pyc`, `rules.py`, `c10/`) never runs, and the
    cache's dodo.py is not read at all."""

    cmd_options = (opt_cwd,)

    def setup(self, opt_values):
        if opt_values.get("cwdPath"):
            os.chdir(opt_values["cwdPath"])
        from c10.rules.dodo import namespace

        self.namespace = namespace()
        self.namespace["DOIT_CONFIG"]["outfile"] = sys.stdout  # doit binds its stream at import

    def load_doit_config(self):
        """doit's config, once the dep DB can open: .c10/ exists, a corrupt DB moved aside. A
        directory without c10.toml is no cache: said before doit fails to open a DB there."""
        if not os.path.isfile(CONFIG_NAME):
            raise InvalidDodoFile(NOT_A_CACHE.format(root=Path.cwd()))
        prepare_control_dir(Path.cwd())
        return super().load_doit_config()

    def load_tasks(self, cmd, pos_args):
        if isinstance(cmd, Clean):
            cmd.dep_manager.close()
            raise InvalidCommand(CLEAN_REFUSED)
        build = session.begin(Path.cwd())  # the run's state; the generators read its plan
        tasks = super().load_tasks(cmd, pos_args)
        if isinstance(cmd, Run):  # `doit [run]`, and each run of `doit auto`
            _own_run(cmd)
            tasks = ignored.guard(tasks, cmd.sel_tasks, cmd.dep_manager, build.root)
        return tasks


NOT_A_CACHE = ("{root}: no c10.toml here, so this is not a c10 cache; run `c10 init .` to make it "
               "one (then edit its c10.toml), or run doit in a cache directory")
CLEAN_REFUSED = ("`doit clean` is not supported in a c10 cache: a build removes the shards and "
                 "index files no Manifest lists by itself, and removing the files the committed "
                 "Manifest lists would leave a cache that no longer verifies; use `doit prune` "
                 "(stale engines and leftovers; `doit prune --apply` removes them), or remove "
                 ".c10/ (doit's DB, refs, hash caches: hints only) to make the next "
                 "`doit build_cache` decide every task again by content hash")
PROCESS_REFUSED = ("c10 runs parallel tasks in threads: use `doit -n N -P thread` (thread is the "
                   "default: `doit -n N` is the same); `-P process` would fork workers that each "
                   "need the build lock, the operator key and the record of what this build "
                   "wrote, which the build holds once, in one process")


def _own_run(cmd: Run) -> None:
    """Wrap doit's run (Run._execute, the call that creates the runner and returns run_all's
    result): `-P process` is refused before any task runs, and once the tasks have finished (doit's
    DB committed, the report written) the build lock is released and the key forgotten, so a
    process that outlives the run (`doit auto`'s watcher between runs) holds neither."""
    execute = cmd._execute
    if getattr(execute, "_c10_run", False):
        return

    @functools.wraps(execute)  # doit reads the parameters from the signature: kept by __wrapped__
    def run(**params):
        if params.get("num_process") and params.get("par_type") == "process":
            raise InvalidCommand(PROCESS_REFUSED)
        try:
            return execute(**params)
        finally:
            session.run_finished()

    run._c10_run = True
    cmd._execute = run


def prepare_control_dir(root: Path) -> None:
    """doit opens its dep DB before any task runs: make .c10/ and move a damaged DB aside."""
    from c10.rules.depdb import recover

    (root / CONTROL_DIR).mkdir(exist_ok=True)
    recover(root / DEP_FILE)  # a corrupt DB is moved aside with a warning instead of stopping doit


@contextlib.contextmanager
def _in_dir(root: Path) -> Iterator[None]:
    """doit resolves every path against the cwd, as when it runs in the cache."""
    before = os.getcwd()
    os.chdir(root)
    try:
        yield
    finally:
        os.chdir(before)


def run_build(root: Path, doit_args: Sequence[str] = ("build_cache",)) -> int:
    """`doit ARGS` in `root` through the same loader as `doit` there; returns doit's exit code.

    A build this thread already began (the Python API: key and lock taken first) is the one run."""
    from doit.doit_cmd import DoitMain

    root = require_cache_root(root)
    active = session.active()
    own = active is None or active.root != root
    build = session.begin(root)  # before the chdir: another thread's build keeps its cwd
    build.replan()
    streams = sys.stdout, sys.stderr
    try:
        with _in_dir(root):
            return DoitMain(CacheLoader(), config_filenames=()).run(list(doit_args))
    finally:
        # doit's actions swap sys.stdout/err to capture output, unlocked: with `-n N` threads
        # one capture can outlive the run and silence the next in-process build
        sys.stdout, sys.stderr = streams
        if own:
            session.end()


def build_status(root: Path, full: bool = False) -> dict:
    """What `doit build_cache` in `root` would run and why, without the lock and without writing
    (full: every tile's stat and content, as C10_FULL_STAT=1 makes a build check them)."""
    from c10.rules import staleness
    from c10.rules.dodo import DOIT_CONFIG, namespace

    root = require_cache_root(root)
    build = session.begin(root)
    build.full = full or None
    try:
        with _in_dir(root):
            plan = build.plan()  # an invalid request is the answer: raise it
            states = staleness.task_states(namespace(), DEP_FILE,
                                           DOIT_CONFIG["check_file_uptodate"])
            return {**staleness.area_facts(plan), "tasks": states}
    finally:
        session.end(save=False)  # hashes computed while checking stay unsaved: nothing is written
