"""The build lock on CACHE/.c10.lock: one build at a time, its holder named, freed on death."""
from __future__ import annotations

import datetime as dt
import errno
import json
import os
import socket
import time
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
    """

    def __init__(self, root: Path):
        self.root = require_cache_root(root)
        self._lock = FileLock(self.root / LOCK_NAME, timeout=0, preserve_lock_file=True,
                              thread_local=False, fallback_to_soft=False)

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
        if self._lock.is_locked:
            self._lock.release(force=True)

    @property
    def held(self) -> bool:
        return self._lock.is_locked

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
