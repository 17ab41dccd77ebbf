"""Reading a cache's files as the verifier does: no symlink followed, no FIFO blocked on, sized."""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from c10.errors import VerifyError
from c10.store.digest import read_fd
from c10.store.layout import ENVELOPE_NAME, MANIFEST_NAME

CONTROL_MAX = 1 << 30  # a Manifest of a million files is a fraction of this; refuse anything larger
# Never follow a planted symlink; never block on a FIFO planted in a file's place.
OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
REBUILD = "rebuild on the build host with `doit build_cache` and copy the cache again"


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

