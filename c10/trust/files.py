"""Reading a cache's files as the verifier does: no symlink followed, no FIFO blocked on, sized."""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import blake3

from c10.errors import VerifyError
from c10.store.digest import read_fd
from c10.store.layout import ENVELOPE_NAME, MANIFEST_NAME

CONTROL_MAX = 1 << 30  # a Manifest of a million files is a fraction of this; refuse anything larger
# Never follow a planted symlink; never block on a FIFO planted in a file's place.
OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# C10_FULL_STAT: a tile rewritten in place (no rename) is seen only by a full-stat build
REBUILD = ("rebuild on the build host with `C10_FULL_STAT=1 doit build_cache` (every tile "
           "checked) and copy the cache again")


def read_control(root: Path, name: str) -> bytes:
    """Read a root control file without following a symlink planted in its place."""
    try:
        data = read_regular(root / name, CONTROL_MAX)
    except OSError as exc:
        raise open_failure(name, exc) from None
    if data is None:
        raise VerifyError("special-file", f"{name} is not a regular file of sane size; {REBUILD}",
                          name)
    return data


def open_failure(rel: str, exc: OSError) -> VerifyError:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        reason = "missing-manifest" if rel in (MANIFEST_NAME, ENVELOPE_NAME) else "missing-file"
        return VerifyError(reason, f"{rel} is missing; {REBUILD}", rel)
    if exc.errno == errno.ELOOP:
        return VerifyError("symlink", f"{rel} is a symlink; caches hold only regular files: "
                           f"{REBUILD}", rel)
    return VerifyError("unreadable", f"cannot read {rel}: {exc.strerror}; check the medium and "
                       f"permissions (`ls -l {rel}`)", rel)


def read_regular(path: Path, limit: int) -> bytes | None:
    """A regular file's bytes, None if it is not one or holds more than `limit`; opened without
    following a symlink or blocking on a FIFO (open errors are raised)."""
    fd = os.open(path, OPEN_FLAGS)
    try:
        st = os.fstat(fd)
        return read_fd(fd, st.st_size) if stat.S_ISREG(st.st_mode) and st.st_size <= limit else None
    finally:
        os.close(fd)



def read_listed(root: Path, entry: dict) -> bytes:
    """A file the Manifest lists, read once (no symlink, a regular singly linked file) and
    returned only if its size and blake3 are the signed ones: what is used is what was checked."""
    rel = entry["path"]
    try:
        fd = os.open(Path(root) / rel, OPEN_FLAGS)
    except OSError as exc:
        raise open_failure(rel, exc) from None
    try:
        data = read_fd(fd, checked_stat(fd, entry).st_size)
    finally:
        os.close(fd)
    check_digest(entry, len(data), blake3.blake3(data).hexdigest())
    return data


def checked_stat(fd: int, entry: dict) -> os.stat_result:
    """The fstat of a listed file opened as `fd`, refused unless it is a regular singly linked
    file of the listed size."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size != entry["size"]:
        raise VerifyError("size-mismatch" if stat.S_ISREG(st.st_mode) else "special-file",
                          f"{entry['path']} is not the regular file of {entry['size']} bytes the "
                          f"Manifest lists; {REBUILD}", entry["path"])
    return st


def check_digest(entry: dict, size: int, digest: str) -> None:
    """hash-mismatch unless the bytes read (their count and blake3) are the listed ones."""
    if size != entry["size"] or digest != entry["blake3"]:
        raise VerifyError("hash-mismatch", f"{entry['path']}: blake3 differs from the Manifest "
                          f"(corrupted or replaced); {REBUILD}", entry["path"])
