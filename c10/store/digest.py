"""blake3 of files and open descriptors: one hasher for the build's hash cache and the verifier."""
from __future__ import annotations

import mmap
import os

import blake3

MMAP_MIN = 1 << 20  # below this one read() beats mmap setup; above, mmap + threads win
_threads = blake3.blake3.AUTO


def _forked() -> None:
    # A forked child inherits the state of blake3's thread pool but none of its threads: a
    # threaded hash there waits forever (c10 pack verifies its image in forked processes).
    global _threads
    _threads = 1


os.register_at_fork(after_in_child=_forked)


def hash_threads(size: int) -> int:
    """blake3's max_threads for `size` bytes in this process: all cores when big, except in a
    forked child (one thread)."""
    return _threads if size >= MMAP_MIN else 1


def blake3_file(path: str | os.PathLike, size: int | None = None) -> str:
    """blake3 hex digest of a file, by the same code as the verifier."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return hash_fd(fd, os.fstat(fd).st_size if size is None else size)
    finally:
        os.close(fd)


def hash_fd(fd: int, size: int, head: bytes = b"") -> str:
    """blake3 hex of an open regular file of `size` bytes (`head` already read from it): one
    read when small, mmap + all cores when big. Reading size+1 bytes makes EOF one syscall."""
    if size >= MMAP_MIN:
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mapped:
            return blake3.blake3(mapped, max_threads=_threads).hexdigest()
    data = head + os.read(fd, size + 1 - len(head))
    if len(data) < size:  # a short read (signal, network filesystem): finish to EOF
        data += read_fd(fd, size - len(data))
    return blake3.blake3(data).hexdigest()


def read_fd(fd: int, size: int) -> bytes:
    """Read to EOF; asking for size+1 makes the usual case a single read() syscall."""
    parts, want = [], size + 1
    while want > 0:
        chunk = os.read(fd, want)
        if not chunk:
            break
        parts.append(chunk)
        want -= len(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)
