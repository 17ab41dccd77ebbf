"""The state of one doit run on one cache, in one object with one lifetime."""
from __future__ import annotations

import gc
import os
import threading
import time
from pathlib import Path

from c10.errors import BuildLockHeldError, C10Error
from c10.plan import ModelPlan, Plan, load_plan
from c10.store.hashcache import HashCache
from c10.store.host import cache_secret
from c10.store.layout import SCAN_MEMO
from c10.store.lock import BuildLock
from c10.store.tiles import write_memo


class Build:
    """One run's plan, hash cache, lock, operator key, loaded engines, first error and report."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.started = time.perf_counter()
        self.hashes = HashCache(self.root)
        self.error: C10Error | None = None
        self.report = None
        # Manifest.json is the payload its envelope signs (the coverage gate decides, once)
        self.commit_intact: bool | None = None
        self.lock: BuildLock | None = None
        self._plan: Plan | C10Error | None = None
        self._key = None
        self._provenance = None
        self._runners: dict[Path, object] = {}
        self._mutex = threading.Lock()
        self._trust_lock = threading.Lock()
        self._gc_paused = False
        self.full: bool | None = None  # full-stat mode (None: C10_FULL_STAT decides)

    # --- the plan, decided once -------------------------------------------------------------

    def plan(self) -> Plan:
        """The plan of this cache, loaded on first use; the request's C10Error otherwise."""
        if self._plan is None:
            self._pause_gc()
            try:
                self._plan = load_plan(self.root, self.hashes, full=self.full)
            except C10Error as exc:
                self._plan = exc
            except BaseException:
                self.resume_gc()
                raise
        if isinstance(self._plan, C10Error):
            raise self._plan
        return self._plan

    def replan(self) -> None:
        """Forget the plan, the first error and the report (the API rewrote c10.toml)."""
        self._plan, self.error, self.report = None, None, None
        self.commit_intact = None
        self.started = time.perf_counter()

    def _pause_gc(self) -> None:
        # 100k tiles, then doit's tasks and dep states: the collector would dominate a no-op. It
        # stays off until the first action runs (resume_gc) or the run ends; what was loaded lives
        # as long as the run, so it is frozen out of every later collection.
        if not self._gc_paused:
            self._gc_paused = True
            gc.disable()

    def resume_gc(self) -> None:
        """Actions allocate freely (decoders, engines): give them the garbage collector back."""
        if self._gc_paused:
            self._gc_paused = False
            gc.freeze()
            gc.enable()

    # --- what writing actions take first ----------------------------------------------------

    def begin_writing(self) -> Plan:
        """Every writing action first checks the key (nothing written if it is refused), then
        locks."""
        plan = self.plan()
        self.resume_gc()
        self.operator_key()
        self.ensure_locked()
        return plan

    def ensure_locked(self) -> None:
        """Take the build lock once per run (a second build fails here, before writing anything)."""
        with self._mutex:
            if self.lock is None or not self.lock.held:  # a forked child holds no lock
                lock = BuildLock(self.root)
                lock.acquire()
                self.lock = lock

    def operator_key(self, signing=None):
        """The operator key of c10.toml's [signing] (or `signing`, a request not yet written),
        loaded and checked once per build: the file is opened exactly once (seed CP-INV-7)."""
        from c10.trust.keys import load_operator_key  # cryptography: a no-op build never signs

        with self._mutex:
            if self._key is None:
                self._key = load_operator_key(signing or self.plan().config.signing, self.root)
            return self._key

    @property
    def provenance(self):
        """Which derived files this build may carry forward or sign (c10.trust.provenance): keyed
        by the operator key's public half and the host's trust store."""
        key = self.operator_key().public_key() if self._provenance is None else None
        with self._trust_lock:  # `doit -n N`: one record of what this build wrote
            if self._provenance is None:
                from c10.trust.keys import keyid, trust_store_keys
                from c10.trust.provenance import Provenance

                self._provenance = Provenance(self.root, {**trust_store_keys(), keyid(key): key})
        return self._provenance

    def save_provenance(self, prune: bool = False) -> None:
        """Save the ledger of what this build wrote, if it wrote anything."""
        if self._provenance is not None:
            self._provenance.save(prune=prune)

    def drop_key(self) -> None:
        """Forget the key as soon as the Manifest is signed (seed CP-INV-7)."""
        self._key = None

    def runner(self, plan: ModelPlan):
        """The model's loaded engine, kept for the run (loading is slower than a small shard);
        `doit -P thread` shard threads share it."""
        from c10.features import engines

        path = self.root / plan.engine_rel
        with self._mutex:
            if path not in self._runners:
                self._runners[path] = engines.load_engine(path, plan.spec, plan.backend)
            return self._runners[path]

    def save_scan_memo(self) -> None:
        """Write this load's tile-scan memo, by the coverage gate under the build lock (loading
        writes nothing: `doit list`, `c10 status` work on a read-only cache)."""
        plan = self._plan
        if isinstance(plan, Plan) and plan.scan is not None:
            write_memo(self.root / SCAN_MEMO, plan.scan, cache_secret(self.root, create=True),
                       changed=plan.state.changed)
            plan.scan = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def close(self, save: bool = True) -> None:
        """Save new hashes (save=False: `c10 status` writes nothing), release the lock, forget the
        key and the engines, give the collector back."""
        try:
            if save:
                self.hashes.save()
                self.save_provenance()
        finally:
            if self.lock is not None:
                self.lock.release()
                self.lock = None
            self._key, self._runners = None, {}
            self.resume_gc()

    def end_run(self) -> None:
        """doit's tasks have finished (its DB committed, the report written): save what the run
        hashed while it still holds the lock, then release the lock and forget the key and the
        engines. The plan, error and report stay until end(): a process that outlives its run
        (`doit auto`'s idle watcher, the Python API reading the report) holds no lock."""
        self.close(save=self.lock is not None and self.lock.held)


# One build per process: doit's state, the cwd and the lock are per process.
_current: Build | None = None
_owner: int | None = None
_guard = threading.Lock()


def begin(root: Path) -> Build:
    """Make this thread the process's one builder for `root` until end(): a build another thread
    starts meanwhile fails at once, as a second process would. The same thread gets its running
    build back (the API begins it, the driver then runs doit in it)."""
    root = Path(root).resolve()
    with _guard:
        global _current, _owner
        me = threading.get_ident()
        if _owner not in (None, me):
            raise BuildLockHeldError(f"{root}: another build is running in this process (pid "
                                     f"{os.getpid()}, another thread)",
                                     "one process builds one cache at a time: wait for it to "
                                     "finish, then re-run")
        if _current is None or _current.root != root:
            if _current is not None:
                _current.close()
            _current = Build(root)
        _owner = me
        return _current


def current() -> Build:
    """The running build (doit's loader or the driver began it); begun for the cwd otherwise."""
    return _current if _current is not None else begin(Path.cwd())


def active() -> Build | None:
    return _current


def run_finished() -> None:
    """A doit run of this thread has finished its tasks: Build.end_run of this thread's build."""
    with _guard:
        build = _current if _owner in (None, threading.get_ident()) else None
    if build is not None:
        build.end_run()


def end(save: bool = True) -> None:
    """Close this thread's build; another thread's build (a refused one's cleanup) is left alone."""
    with _guard:
        global _current, _owner
        if _owner not in (None, threading.get_ident()):
            return
        build, _current, _owner = _current, None, None
    if build is not None:
        build.close(save)
