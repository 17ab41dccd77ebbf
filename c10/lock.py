"""The build lock on CACHE/.c10.lock: one build at a time, the holder named, free the moment it dies."""
from __future__ import annotations

import datetime as dt
import json
import os
import socket
from pathlib import Path

from filelock import FileLock, Timeout

from c10 import atomic
from c10.errors import BuildLockHeldError, CacheRootMissingError, ConfigError

LOCK_NAME = ".c10.lock"
HOLDER = ".c10/lock-holder.json"
# flock on these is either a no-op or per-client, so two hosts could both "hold" the lock.
NETWORK_FS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "fuse.sshfs", "9p", "afs", "ceph", "glusterfs"})


def require_cache_root(root: Path) -> Path:
    """The cache root must already exist (seed CP-INV-5): c10 never creates it."""
    root = Path(root)
    if not root.is_dir():
        raise CacheRootMissingError(f"{root}: cache directory does not exist; create it and run `c10 init {root}`")
    return root.resolve()


def filesystem_type(path: Path) -> str:
    """The type of the file system holding `path`, from /proc/mounts (longest mount-point prefix)."""
    best, kind = "", "unknown"
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    target = str(Path(path).resolve())
    for line in lines:
        parts = line.split()
        if len(parts) >= 3:
            mount = parts[1].replace("\\040", " ")
            if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
                best, kind = mount, parts[2]
    return kind


class BuildLock:
    """Hold .c10.lock for one build; `acquire` fails at once if another process holds it."""

    def __init__(self, root: Path):
        self.root = require_cache_root(root)
        self._lock = FileLock(self.root / LOCK_NAME, timeout=0, preserve_lock_file=True)

    def acquire(self) -> None:
        fs = filesystem_type(self.root)
        if fs in NETWORK_FS and not os.environ.get("C10_ALLOW_NETWORK_FS"):
            raise ConfigError(f"{self.root}: cache is on a network file system ({fs}) where the build lock "
                              "cannot be trusted; build on a local disk and copy the cache, "
                              "or set C10_ALLOW_NETWORK_FS=1 if only one host ever builds here")
        try:
            self._lock.acquire()
        except Timeout:
            raise BuildLockHeldError(f"{self.root}: another build holds {LOCK_NAME} ({self.holder()}); "
                                     "wait for it to finish or stop it, then re-run") from None
        atomic.write_text(self.root / HOLDER, json.dumps(
            {"pid": os.getpid(), "host": socket.gethostname(),
             "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}))

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release(force=True)

    @property
    def held(self) -> bool:
        return self._lock.is_locked

    def holder(self) -> str:
        try:
            info = json.loads((self.root / HOLDER).read_text())
            return f"pid {info['pid']} on {info['host']}, started {info['started']}"
        except (OSError, ValueError, KeyError):
            return "holder unknown"

    def __enter__(self) -> "BuildLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
