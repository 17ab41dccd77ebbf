"""The one atomic-write helper: temp file, fsync, os.replace, fsync the directory."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import tempfile
from pathlib import Path
from typing import Iterator

from c10.errors import StorageError

# What to do about a failed write, by errno (the rest: check the disk).
_HINTS = {
    errno.ENOSPC: "the disk is full: free space",
    errno.EDQUOT: "the disk quota is exhausted: free space",
    errno.EROFS: "the file system is read-only: remount it read-write",
    errno.EACCES: "no permission: fix the ownership of the cache directory",
    errno.EPERM: "no permission: fix the ownership of the cache directory",
    errno.EIO: "the disk reported an I/O error: check it (dmesg, smartctl)",
}


def fsync_dir(directory: Path) -> None:
    """Make a rename inside `directory` durable (an fsync error is fatal, never retried)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_filesystem(path: Path) -> None:
    """Make every write on the file system of `path` durable, as one batch: syncfs(2), then an
    fsync of `path` (a directory), whose error a writeback failure also reaches. What a build
    wrote with `replace_unsynced` is durable once this returns: the commit calls it before it
    signs anything (one flush instead of two per file, as git's core.fsyncMethod=batch). Where
    syncfs is missing (not Linux), sync(2)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        os.fsync(fd)
    except OSError as exc:
        raise storage_error(Path(path), exc) from None
    finally:
        os.close(fd)


def _syncfs(fd: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "syncfs"):
        os.sync()
        return 0
    return libc.syncfs(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def storage_error(target: Path, exc: OSError) -> StorageError:
    """The clean error for a failed write of `target`: what, where, and the next step."""
    hint = _HINTS.get(exc.errno, "check the disk")
    err = StorageError(f"{target}: cannot write it ({exc.strerror or exc}); the previous Manifest "
                       "stays in force", hint)
    err.errno = exc.errno  # (strerror and filename stay unset: they would replace the message)
    return err


def _new_temp(target: Path, staging: str | os.PathLike | None) -> Path:
    """An empty temp file beside `target` (or in `staging`); an OSError becomes a StorageError."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if staging is not None:
            os.makedirs(staging, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp",
                                   dir=staging or target.parent)
        os.close(fd)
    except OSError as exc:
        raise storage_error(target, exc) from None
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, mode: int = 0o644,
                staging: str | os.PathLike | None = None, rename: bool = True) -> Iterator[Path]:
    """Yield a temp path beside `target` (or in `staging`, a dir of the same file system that
    verify never reads: a kill then leaves nothing in shipped dirs); on success fsync it and
    rename it over `target`.

    For writers that only take a file name (faiss, onnxruntime, OpenVINO). On any error the
    temp file is removed, `target` is left as it was, and an OSError becomes a StorageError.
    A failed fsync is never retried: the kernel may already have dropped the dirty pages
    and cleared the error, so a second fsync could report success for lost data.
    rename=False: only create the temp file (and remove it if it is still there at the end).
    """
    target = Path(target)
    tmp_path = _new_temp(target, staging)
    if not rename:
        try:
            os.chmod(tmp_path, mode)
            yield tmp_path
        finally:
            with contextlib.suppress(OSError):
                tmp_path.unlink()
        return
    try:
        yield tmp_path
        os.chmod(tmp_path, mode)
        _fsync_file(tmp_path)
        os.replace(tmp_path, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        if isinstance(exc, OSError) and not isinstance(exc, StorageError):
            raise storage_error(target, exc) from None
        raise
    try:
        fsync_dir(target.parent)
    except OSError as exc:  # the new bytes are in place but maybe not durable: fail the build
        raise storage_error(target, exc) from None


def write_bytes(target: str | os.PathLike, data: bytes, mode: int = 0o644,
                staging: str | os.PathLike | None = None) -> None:
    """Atomically replace `target` with `data` (temp file in `staging` if given, see
    atomic_path)."""
    with atomic_path(target, mode, staging) as tmp:
        _write_all(tmp, data)


def write_together(items: list[tuple[Path, bytes]],
                   staging: str | os.PathLike | None = None) -> None:
    """Replace several files in order with the smallest window between them: every temp file is
    written and fsynced first, then the renames run back to back, then each directory is fsynced
    (the Manifest pair: a kill can fall only between two renames)."""
    with contextlib.ExitStack() as stack:
        temps = [stack.enter_context(atomic_path(target, staging=staging,
                                                 rename=False)) for target, _ in items]
        for tmp, (_, data) in zip(temps, items):
            _write_all(tmp, data)
            _fsync_file(tmp)
        try:
            for tmp, (target, _) in zip(temps, items):
                os.replace(tmp, target)
            for directory in dict.fromkeys(Path(target).parent for target, _ in items):
                fsync_dir(directory)
        except OSError as exc:
            raise storage_error(Path(items[0][0]), exc) from None


def move_into(staged: Path, target: Path) -> None:
    """Rename a finished, fsynced file (made by a writer that takes a path) over `target`,
    durably."""
    try:
        os.replace(staged, target)
        fsync_dir(Path(target).parent)
    except OSError as exc:
        raise storage_error(Path(target), exc) from None


def _write_all(path: Path, data: bytes) -> None:
    """os.write until done: short writes are legal, and one syscall path for fault injection."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    try:
        view = memoryview(data).cast("B")
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def replace_unsynced(target: str | os.PathLike, data: bytes,
                     staging: str | os.PathLike | None = None) -> None:
    """Replace `target` by a rename like write_bytes, but without an fsync: a kill leaves the old
    or the new bytes, a power cut may leave neither. Only for files whose reader compares them
    with a record kept elsewhere (a ref, against doit's saved value; a shard or a tile list,
    against the hash its ledger entry or ref records), so a lost one is rebuilt, and which are
    made durable by `sync_filesystem` before any Manifest names them."""
    target = Path(target)
    tmp = _new_temp(target, staging)
    try:
        _write_all(tmp, data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise storage_error(target, exc) from None


def write_unsynced(target: str | os.PathLike, data: bytes) -> None:
    """Write `data` over `target` in place, no temp file, no fsync: only for caches whose reader
    checks every file against a hash recorded elsewhere (a torn one is then just recomputed)."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as f:
            f.write(data)
    except OSError as exc:
        raise storage_error(target, exc) from None


def write_text(target: str | os.PathLike, text: str, mode: int = 0o644,
               staging: str | os.PathLike | None = None) -> None:
    """Atomically replace `target` with UTF-8 `text`."""
    write_bytes(target, text.encode("utf-8"), mode, staging)


def is_temp_name(name: str) -> bool:
    """True for a leftover temp file of `atomic_path` (a killed writer leaves these)."""
    return name.startswith(".") and name.endswith(".tmp")
