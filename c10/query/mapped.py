"""The signed FAISS index opened with IO_FLAG_MMAP: the inode hash-checked is the one mapped."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import blake3

from c10.errors import VerifyError
from c10.trust.files import OPEN_FLAGS, REBUILD, check_digest, checked_stat, open_failure

CHUNK = 1 << 23


def open_index(root: Path, entry: dict, mmap: bool = True):
    """The listed index file as a FAISS index, read only if its size and blake3 are the signed ones.

    The window between the check and the map, and what we chose: the file is opened once
    (no symlink), hashed through that descriptor, and mapped through the same descriptor
    (/proc/self/fd/N), so a rename or a replaced path after the check cannot swap the file; its
    fstat (size, mtime, ctime) must be the same after the map as before the hash, so an in-place
    write during the check is refused. A write into the same inode after that is seen by the map,
    as by any mmap: the flight image is mounted read-only (docs/scale.md). mmap=False (or no
    /proc/self/fd): the checked bytes are deserialized into memory, as before."""
    import faiss
    import numpy as np

    rel = entry["path"]
    try:
        fd = os.open(Path(root) / rel, OPEN_FLAGS)
    except OSError as exc:
        raise open_failure(rel, exc) from None
    try:
        before = checked_stat(fd, entry)
        data = _hash(fd, entry, keep=not (mmap and _proc_fd()))
        if data is not None:
            return faiss.deserialize_index(np.frombuffer(data, np.uint8))
        index = faiss.read_index(f"/proc/self/fd/{fd}", faiss.IO_FLAG_MMAP)
        if _identity(os.fstat(fd)) != _identity(before):
            raise VerifyError("hash-mismatch", f"{rel} changed while it was being opened; "
                              f"{REBUILD}", rel)
        return index
    finally:
        os.close(fd)


def _proc_fd() -> bool:
    return sys.platform.startswith("linux") and os.path.isdir("/proc/self/fd")


def _identity(st: os.stat_result) -> tuple:
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _hash(fd: int, entry: dict, keep: bool) -> bytes | None:
    """Hash the file through `fd` in chunks; its bytes if `keep` (else None: it is mapped)."""
    hasher, parts, offset = blake3.blake3(), [], 0
    while chunk := os.pread(fd, CHUNK, offset):
        hasher.update(chunk)
        offset += len(chunk)
        if keep:
            parts.append(chunk)
    check_digest(entry, offset, hasher.hexdigest())
    return b"".join(parts) if keep else None
