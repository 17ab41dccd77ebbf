"""The build lock on CACHE/.c10.lock: one build at a time, its holder named, freed on death."""
from __future__ import annotations

import datetime as dt
import errno
import json
import os
import socket
import time
import weakref
from pathlib import Path

from filelock import FileLock, Timeout

from c10.errors import BuildLockHeldError, CacheRootMissingError, ConfigError
from c10.store import atomic
from c10.store.layout import LOCK_HOLDER, LOCK_NAME

# flock on these is either a no-op or per-client, so two hosts could both "hold" the lock.
NETWORK_FS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "fuse.sshfs", "9p", "afs", "ceph",
                        "glusterfs"})
# A new holder writes its name just after taking the lock: a loser waits this long to read it.
HOLDER_WAIT_S = 0.5


def require_cache_root(root: Path) -> Path:
    """The cache root must already exist (seed CP-INV-5): c10 never creates it."""
    root = Path(root)
    if not root.is_dir():
        raise CacheRootMissingError(f"{root}: cache directory does not exist; create it and run "
                                    f"`c10 init {root}`")
    return root.resolve()


def filesystem_type(path: Path, mounts: str | None = None) -> str:
    """The type of the file system holding `path`, from /proc/mounts (longest mount-point
    prefix)."""
    best, kind = "", "unknown"
    try:
        lines = (Path("/proc/mounts").read_text() if mounts is None else mounts).splitlines()
    except OSError:
        return kind
    target = str(Path(path).resolve())
    for line in lines:
        parts = line.split()
        if len(parts) >= 3:
            mount = parts[1].replace("\\040", " ")
            under = target == mount or target.startswith(mount.rstrip("/") + "/")
            if under and len(mount) > len(best):
                best, kind = mount, parts[2]
    return kind


def refuse_network_fs(root: Path, mounts: str | None = None) -> str:
    """The file system type of `root`; ConfigError if it is one where flock cannot be trusted."""
    fs = filesystem_type(root, mounts)
    if fs in NETWORK_FS and not os.environ.get("C10_ALLOW_NETWORK_FS"):
        raise ConfigError(f"{root}: cache is on a network file system ({fs}) where the build lock "
                          "cannot be trusted; build on a local disk and copy the cache, "
                          "or set C10_ALLOW_NETWORK_FS=1 if only one host ever builds here")
    return fs


class BuildLock:
    """Hold .c10.lock for one build; `acquire` fails at once if another process holds it.

    flock(2) on an open file: the kernel drops it the moment the holder exits or is killed,
    so a stale lock file never blocks the next build. Process-wide (not per thread), never
    degraded to a lock-by-existence on a file system without flock.

    flock belongs to the open file description, which a forked child shares: a child that kept
    the descriptor would hold the lock after its parent died (`doit auto`'s watcher), and one
    that unlocked it would free its parent's lock. The descriptor is close-on-exec (Python's
    default), and a forked child closes it without unlocking (_close_inherited) and never
    counts as the holder.
    """

    def __init__(self, root: Path):
        self.root = require_cache_root(root)
        self._lock = FileLock(self.root / LOCK_NAME, timeout=0, preserve_lock_file=True,
                              thread_local=False, fallback_to_soft=False)
        self._pid: int | None = None  # the process that took it

    def acquire(self) -> None:
        fs = refuse_network_fs(self.root)
        try:
            self._lock.acquire()
        except Timeout:
            raise BuildLockHeldError(f"{self.root}: another build holds {LOCK_NAME} "
                                     f"({self._wait_holder()}); wait for it to finish or stop it, "
                                     "then re-run") from None
        except OSError as exc:
            raise self._no_flock(fs, exc) from None
        self._pid = os.getpid()
        _HELD.add(self)
        try:
            atomic.write_text(self.root / LOCK_HOLDER, json.dumps(
                {"pid": os.getpid(), "host": socket.gethostname(),
                 "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}))
        except BaseException:
            self.release()  # a lock we cannot name the holder of is not kept
            raise

    def _no_flock(self, fs: str, exc: OSError) -> ConfigError:
        why = "does not support flock" if exc.errno in (errno.ENOSYS,
                                                        errno.EOPNOTSUPP) else exc.strerror
        return ConfigError(f"{self.root / LOCK_NAME}: cannot take the build lock ({why}, file "
                           f"system {fs}); build on a local disk (ext4, xfs, btrfs, tmpfs) and "
                           "copy the cache")

    def release(self) -> None:
        if self.held:
            self._lock.release(force=True)
        self._pid = None
        _HELD.discard(self)

    @property
    def held(self) -> bool:
        """Held by this process (a forked child inherits the object, never the lock)."""
        return self._pid == os.getpid() and self._lock.is_locked

    def _close_inherited(self) -> None:
        """In a forked child: close the inherited descriptor, never flock(LOCK_UN) it (that would
        free the parent's lock), and forget the hold. Recent filelock releases (4.3.1 here) do
        the same on their own; an older one leaves its state to clear here."""
        context = getattr(self._lock, "_context", None)
        fd = getattr(context, "lock_file_fd", None)
        if fd is not None:
            try:
                st, mine = os.fstat(fd), os.stat(self.root / LOCK_NAME)
                if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                    os.close(fd)
            except OSError:
                pass  # already closed (by filelock's own hook) or the file is gone
            context.lock_file_fd, context.lock_counter = None, 0
        self._pid = None

    def holder(self) -> str:
        info = self._holder_info()
        if info is None:
            return "holder unknown"
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"

    def _holder_info(self) -> dict | None:
        try:
            info = json.loads((self.root / LOCK_HOLDER).read_text())
            return info if isinstance(info, dict) and {"pid", "host",
                                                       "started"} <= set(info) else None
        except (OSError, ValueError, TypeError):
            return None

    def _wait_holder(self) -> str:
        """The holder, once it has written its name (a live pid on this host; briefly polled)."""
        deadline = time.monotonic() + HOLDER_WAIT_S
        while time.monotonic() < deadline:
            info = self._holder_info()
            if info is not None and (info["host"] != socket.gethostname() or _alive(info["pid"])):
                break
            time.sleep(0.02)
        return self.holder()

    def __enter__(self) -> "BuildLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# Locks this process holds, for the fork hook below.
_HELD: weakref.WeakSet[BuildLock] = weakref.WeakSet()


def _close_inherited_locks() -> None:
    for lock in list(_HELD):
        lock._close_inherited()
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
