"""blake3 hashes behind a stat fast path and a persistent cache: unchanged bytes hash once."""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Callable, Container, Sequence

from c10.store import atomic
from c10.store.digest import blake3_file
from c10.store.layout import HASH_CACHES, tile_hashes_relpath


def stat_key(st: os.stat_result) -> tuple[int, int, int, int]:
    """What must not change for a cached hash to stay valid (ctime catches a same-mtime rewrite)."""
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


class HashCache:
    """Maps a relative path to (stat key, blake3); consulted only when a stat does not match."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._root = str(self.root)
        self._buckets: dict[str, dict[str, list]] = {}
        self._dirty: set[str] = set()
        self._lock = threading.RLock()  # remember() and save() load buckets under it
        self._saved = time.monotonic()
        self._migrated = False
        self._names: dict[str, str] = {}  # directory of a path -> its bucket
        self._legacy: Path | None = None  # hashes-tiles.json, removed once its columns are saved
        self._checked: set[str] = set()  # paths this build stat'ed and hashed (size_hash)

    def _bucket(self, rel: str) -> tuple[str, dict[str, list]]:
        # one split per directory, not per lookup (a shard task looks up each of its tiles)
        head = rel[:rel.rfind("/") + 1]
        name = self._names.get(head)
        if name is None:
            name = self._names[head] = _bucket_name(head + "t")
        if name not in self._buckets:
            with self._lock:  # `doit -n N` threads: one load (and migration) per bucket
                if name != "other" and not self._migrated:
                    self._migrate()
                if name not in self._buckets:
                    self._buckets[name] = _read(self.root / _bucket_path(name))
        return name, self._buckets[name]

    def _migrate(self) -> None:
        """Split an older cache's one hashes-tiles.json into column files (written at the next
        save, which then removes it): an upgrade re-hashes nothing."""
        self._migrated = True
        legacy = self.root / HASH_CACHES["tiles"]
        if not legacy.exists():
            return
        for rel, entry in _read(legacy).items():
            name = _bucket_name(rel)
            if name == "other" or (self.root / _bucket_path(name)).exists():
                continue  # a column file is newer than the legacy file
            self._buckets.setdefault(name, {})[rel] = entry
            self._dirty.add(name)
        self._legacy = legacy

    def lookup(self, rel: str, st: os.stat_result) -> str | None:
        """The cached hash of `rel` if its stat key still matches."""
        entry = self._bucket(rel)[1].get(rel)
        if entry is not None and tuple(entry[:4]) == stat_key(st):
            return entry[4]
        return None

    def hash(self, rel: str, st: os.stat_result | None = None) -> tuple[str, os.stat_result]:
        """(blake3, stat) of `rel`, from the cache when its stat key matches, else computed and
        cached."""
        # os.path.join, not Path: this runs once per tile of every shard a build touches
        full = os.path.join(self._root, rel)
        st = os.stat(full) if st is None else st
        digest = self.lookup(rel, st)
        if digest is None:
            digest = blake3_file(full, st.st_size)
            self.remember(rel, st, digest)
        self._checked.add(rel)
        return digest, st

    def hash_tiles(self, rels: Sequence[str]) -> list[str | None]:
        """hash() of each tile of one column directory (one bucket), None for a file gone: the
        block keys' loop over every tile of a changed column, one stat each and no second lookup
        of the bucket."""
        if not rels:
            return []
        bucket = self._bucket(rels[0])[1]
        base, stat, checked, out = self._root + os.sep, os.stat, self._checked, []
        for rel in rels:
            try:
                st = stat(base + rel)
                entry = bucket.get(rel)
                if entry is not None and entry[0] == st.st_size and \
                        entry[1] == st.st_mtime_ns and entry[2] == st.st_ino and \
                        entry[3] == st.st_ctime_ns:
                    digest = entry[4]
                else:
                    digest = blake3_file(base + rel, st.st_size)
                    self.remember(rel, st, digest)
            except OSError:
                out.append(None)
                continue
            checked.add(rel)
            out.append(digest)
        return out

    def size_hash(self, rel: str) -> tuple[int, str]:
        """(size, blake3) of `rel` as this build already stat'ed and hashed it, else hash()'s. The
        graph load's block keys stat every tile of a changed column; the shard task that follows
        needs no second stat. A tile rewritten in between keeps the load's blake3 in its shard row
        and its Manifest entry: `c10 verify` refuses that, and the next build re-embeds it."""
        if rel in self._checked:
            entry = self._bucket(rel)[1].get(rel)
            if entry is not None:
                return entry[0], entry[4]
        digest, st = self.hash(rel)
        return st.st_size, digest

    def remember(self, rel: str, st: os.stat_result, digest: str) -> None:
        with self._lock:
            name, bucket = self._bucket(rel)
            bucket[rel] = [*stat_key(st), digest]
            self._dirty.add(name)

    def hash_abs(self, path: str | os.PathLike) -> str:
        """blake3 of a file anywhere (models may live outside the cache), cached by its absolute
        path."""
        return self.hash(str(Path(path).resolve()))[0]

    def retain(self, keep: Callable[[str], Container[str]]) -> None:
        """Drop the loaded entries of every path not in `keep(bucket)` (files the build no longer
        has; a bucket is a column "z/x" of tiles, or "other"), so the cache does not grow forever;
        nothing is stat'ed, and an unloaded bucket stays as it is. keep() is not even called when
        nothing was added since the load (a no-op: the last retain already dropped what it could),
        and only for the loaded buckets (a strip of new tiles loads its own columns)."""
        with self._lock:
            if not self._dirty:
                return
            for name, bucket in self._buckets.items():
                kept = keep(name)
                gone = [path for path in bucket if path not in kept]
                for path in gone:
                    del bucket[path]
                if gone:
                    self._dirty.add(name)

    def save(self, min_interval: float = 0.0) -> None:
        """Write the changed cache files atomically (not again within `min_interval` seconds)."""
        with self._lock:
            if self._dirty and time.monotonic() - self._saved < min_interval:
                return
            for name in sorted(self._dirty):
                data = json.dumps(self._buckets[name], separators=(",", ":"),
                                  sort_keys=True).encode()
                if name == "other":
                    atomic.write_bytes(self.root / HASH_CACHES[name], data)
                else:  # no fsync per column: a torn file does not parse, and is re-hashed
                    atomic.write_unsynced(self.root / _bucket_path(name), data)
            self._dirty.clear()
            if self._legacy is not None:
                self._legacy.unlink(missing_ok=True)
                self._legacy = None
            self._saved = time.monotonic()


def _bucket_name(rel: str) -> str:
    """The column tiles/{z}/{x} of a tile's path; "other" for every other file."""
    parts = rel.split("/")
    if len(parts) == 4 and parts[0] == "tiles" and _number(parts[1]) and _number(parts[2]):
        return f"{parts[1]}/{parts[2]}"
    return "other"


def _number(part: str) -> bool:
    return part.isascii() and part.isdigit()


def _bucket_path(name: str) -> str:
    return HASH_CACHES["other"] if name == "other" else tile_hashes_relpath(*name.split("/"))


def _read(path: Path) -> dict[str, list]:
    try:
        found = json.loads(path.read_bytes())
    except (FileNotFoundError, ValueError):
        # A torn or missing cache only costs re-hashing; it is never trusted partially.
        return {}
    return found if isinstance(found, dict) else {}
