"""Block staleness decided from the tile scan: content digests of column segments, recomputed only
where a column directory changed (every tile in full-stat mode)."""
from __future__ import annotations

import bisect
import os
import threading

import blake3

from c10.store.hashcache import HashCache
from c10.store.layout import TILES_DIR
from c10.store.tiles import Scan

# Stat every tile and check its content instead of trusting unchanged column directories: catches
# an in-place rewrite that keeps the name (`cp` over a tile), which leaves the directory as it was.
FULL_STAT_ENV = "C10_FULL_STAT"


def full_stat() -> bool:
    """C10_FULL_STAT=1 in the environment: every tile is stat'ed (and re-hashed on a change)."""
    return os.environ.get(FULL_STAT_ENV, "").strip().lower() not in ("", "0", "no", "false")


class BlockState:
    """The content key of any rectangle of tiles: one digest per (column, block row) segment, over
    its tiles' paths and blake3. A segment of a column whose directory stat is unchanged comes
    from the scan memo (MAC'd: a forged one is never read); any other is hashed through the hash
    cache (a stat, and blake3 only when the stat changed) and kept in the memo for the next load.

    What this does not see by default: a tile rewritten in place (same name, no rename, so the
    directory's mtime stays): full=True (C10_FULL_STAT=1, `c10 status --full`) checks every tile."""

    def __init__(self, scan: Scan, hashes: HashCache, block: int, full: bool = False):
        self._scan, self._hashes, self._block, self.full = scan, hashes, block, full
        self._computed: dict[tuple[str, int], str] = {}
        self._rects: dict[tuple[int, int, int, int, int], str] = {}  # the shard and manifest tasks
        self._lock = threading.Lock()
        self.changed = False  # a segment digest the memo did not hold was added to it

    def rect_key(self, z: int, x0: int, x1: int, y0: int, y1: int) -> str:
        """Digest of the tiles in [x0, x1] x [y0, y1] at zoom z (inclusive) and of the rectangle
        itself: whole segments, so a tile of the same segment outside it also changes the key.
        Once per rectangle and load: the shard task and the manifest task both ask."""
        rect = (z, x0, x1, y0, y1)
        found = self._rects.get(rect)
        if found is None:
            found = self._rects[rect] = self._rect_key(*rect)
        return found

    def _rect_key(self, z: int, x0: int, x1: int, y0: int, y1: int) -> str:
        key = blake3.blake3(f"{z}/{x0}-{x1}/{y0}-{y1}\n".encode())
        rows = range(y0 // self._block, y1 // self._block + 1)
        for x in range(x0, x1 + 1):
            prefix = f"{TILES_DIR}/{z}/{x}"
            if prefix in self._scan.columns:
                for by in rows:
                    key.update(f"{x}:{by}={self._segment(prefix, by)}\n".encode())
        return key.hexdigest()

    def _segment(self, prefix: str, by: int) -> str:
        name = f"{self._block}:{by}"
        if not self.full:
            known = self._scan.segments.get(prefix)
            if known is not None and name in known:
                return known[name]
        with self._lock:
            found = self._computed.get((prefix, by))
            if found is None:
                found = self._computed[(prefix, by)] = self._hash_segment(prefix, by, name)
            return found

    def _hash_segment(self, prefix: str, by: int, name: str) -> str:
        rows = self._scan.columns[prefix]
        lo = bisect.bisect_left(rows, by * self._block, key=lambda t: t.y)
        hi = bisect.bisect_left(rows, (by + 1) * self._block, key=lambda t: t.y)
        paths = [tile.path for tile in rows[lo:hi]]
        digests = self._hashes.hash_tiles(paths)
        complete = None not in digests  # else one went since the scan: the task runs, names it
        found = blake3.blake3("".join(f"{path}\0{digest or 'missing'}\n"
                                      for path, digest in zip(paths, digests)).encode()).hexdigest()
        memo = self._scan.memo.get(prefix) if self._scan.memo is not None else None
        if complete and memo is not None and memo[3].get(name) != found:
            memo[3][name] = found
            self.changed = True
        return found
