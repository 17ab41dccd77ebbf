"""blake3 content hashes with a stat fast path and a persistent cache, so unchanged bytes are hashed once."""
from __future__ import annotations

import json
import mmap
import os
import threading
import time
from pathlib import Path

import blake3

from c10 import atomic

# Two files: the big one for tiles is loaded only when a tile's stat changed; the small one
# (models, engines, shards...) is read on every graph load to key engines.
HASH_CACHES = {"tiles": ".c10/hashes-tiles.json", "other": ".c10/hashes.json"}
MMAP_MIN = 1 << 20  # below this one read() beats mmap setup; above, mmap + threads win


def stat_key(st: os.stat_result) -> tuple[int, int, int, int]:
    """What must not change for a cached hash to stay valid (ctime catches a same-mtime rewrite)."""
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


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
            return blake3.blake3(mapped, max_threads=blake3.blake3.AUTO).hexdigest()
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


class HashCache:
    """Maps a relative path to (stat key, blake3); consulted only when a stat does not match."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._root = str(self.root)
        self._buckets: dict[str, dict[str, list]] = {}
        self._dirty: set[str] = set()
        self._lock = threading.Lock()
        self._saved = time.monotonic()

    def _bucket(self, rel: str) -> tuple[str, dict[str, list]]:
        name = "tiles" if rel.startswith("tiles/") else "other"
        if name not in self._buckets:
            try:
                self._buckets[name] = json.loads((self.root / HASH_CACHES[name]).read_bytes())
            except (FileNotFoundError, ValueError):
                # A torn or missing cache only costs re-hashing; it is never trusted partially.
                self._buckets[name] = {}
        return name, self._buckets[name]

    def lookup(self, rel: str, st: os.stat_result) -> str | None:
        """The cached hash of `rel` if its stat key still matches."""
        entry = self._bucket(rel)[1].get(rel)
        if entry is not None and tuple(entry[:4]) == stat_key(st):
            return entry[4]
        return None

    def hash(self, rel: str, st: os.stat_result | None = None) -> tuple[str, os.stat_result]:
        """(blake3, stat) of `rel`, from the cache when its stat key matches, else computed and cached."""
        # os.path.join, not Path: this runs once per tile of every shard a build touches
        full = os.path.join(self._root, rel)
        st = os.stat(full) if st is None else st
        digest = self.lookup(rel, st)
        if digest is None:
            digest = blake3_file(full, st.st_size)
            self.remember(rel, st, digest)
        return digest, st

    def remember(self, rel: str, st: os.stat_result, digest: str) -> None:
        with self._lock:
            name, bucket = self._bucket(rel)
            bucket[rel] = [*stat_key(st), digest]
            self._dirty.add(name)

    def forget_missing(self) -> None:
        """Drop entries of files that no longer exist, so the cache does not grow forever."""
        for name, bucket in self._buckets.items():
            gone = [rel for rel in bucket if not (self.root / rel).exists()]
            for rel in gone:
                del bucket[rel]
            if gone:
                self._dirty.add(name)

    def save(self, min_interval: float = 0.0) -> None:
        """Write the changed cache files atomically (not again within `min_interval` seconds)."""
        with self._lock:
            if self._dirty and time.monotonic() - self._saved < min_interval:
                return
            for name in sorted(self._dirty):
                data = json.dumps(self._buckets[name], separators=(",", ":"), sort_keys=True).encode()
                atomic.write_bytes(self.root / HASH_CACHES[name], data)
            self._dirty.clear()
            self._saved = time.monotonic()
