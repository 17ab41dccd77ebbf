"""Shard rows by content, as Bazel's action cache reuses an action's outputs by its inputs' digests:
a descriptor (or local-feature row) is taken from any trusted shard that holds the same tile bytes
under the same embedding identity, whichever block or z/x/y id it was built under.

A row is a function of the tile's bytes and the identity alone (engine key + preprocessing:
c10.features.preprocess decodes and resizes the file's bytes, c10.features.embedding runs the
tensor; the tile's id enters neither), so a block size change, a tile moved between blocks or
copied under another id, a reverted request or a re-widened area embeds nothing again while a
trusted shard still holds the row.

Trust is the caller's: a Source is a shard file it trusts and a reader that returns the file's
bytes only if they are still the trusted ones (c10.trust.provenance). Lookups try the versions of
the same block first (no index: the common incremental case), then an index (tile blake3 prefix
-> sources, per identity prefix), a hint built lazily, once, from the key columns of the sources,
read through a small buffer; the value columns are taken only for rows actually reused, from bytes
the reader verified at that moment, after checking that the row holds that very tile blake3 and
identity. A file changed after it was indexed, or never trusted, is never a source."""
from __future__ import annotations

import functools
import io
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Sequence

import numpy as np

from c10.trust.files import OPEN_FLAGS

Key = tuple[tuple[int, int, int], str]  # (tile id, tile blake3 hex); the id is not part of a match
Row = tuple[np.ndarray, ...]            # one tile's value columns
# reuse(keys) -> the trusted row of each key, or None where it must be computed
Reuse = Callable[[Sequence[Key]], list[Row | None]]

_BLAKE3 = np.dtype(("u1", (32,)))
_IDENT = np.dtype(("u1", (8,)))
_VALUE = np.dtype("<f4")
_CHUNK = 1 << 20  # bytes of whole rows read at a time while indexing a source
_HEADER_MAX = 1 << 16


@dataclass(frozen=True)
class Source:
    """A shard file the caller trusts: its key columns are read from `path` (a hint), its rows
    only from `read()`, which returns the file's bytes if they are still the trusted ones."""

    path: Path
    read: Callable[[], bytes | None]
    logical: str | None = None  # the shard it is a version of: tried first for that shard
    listed: bool = False        # covered by the store's `listed` digests (a signed Manifest's)


def ident_tag(ident: str) -> int:
    """The identity prefix a shard's `ident` column holds (8 bytes), as one integer."""
    return int.from_bytes(bytes.fromhex(ident)[:8], "little")


class DescriptorStore:
    """Trusted rows by (tile blake3, identity), for one build: the trusted sources (taken once,
    when first needed), then the shards the build writes (`add`). Thread-safe.

    `listed()`: the first 8 bytes of the tile digests the `listed` sources may hold, as sorted
    uint64 (the tiles a signed Manifest lists hold the rows of its shards): they are indexed
    only once a missing tile's digest is among them, so a new tile costs no scan of the
    committed shards. A wrong listing may cost a computation, never a wrong row."""

    def __init__(self, sources: Iterable[Source] | Callable[[], Iterable[Source]],
                 listed: Callable[[], np.ndarray] | None = None):
        self._given, self._listed = sources, listed
        self._listed_keys: np.ndarray | None = None  # sorted
        self._sources: list[Source] = []
        self._by_path: dict[str, int] = {}
        self._near: dict[str, list[int]] = {}
        self._indexed: set[int] = set()
        self._tables: dict[int, _Table] = {}
        self._lock = threading.Lock()        # sources, tables, counters
        self._scan_lock = threading.Lock()   # the one snapshot, the scans
        self._snapshot = False
        self._scanned: set[bool] = set()     # which of the unlisted / listed sources are indexed
        self.scanned = 0    # sources whose key columns were read
        self.reads = 0      # sources read for their rows

    # --- what the build asks --------------------------------------------------------------

    def reuser(self, ident: str, columns: Sequence[str], logical: str | None = None) -> Reuse:
        """reuse(keys) for one shard of identity `ident` with these value columns: the versions of
        `logical` first (a block whose tiles did not move needs no index), then the index."""
        tag, columns = ident_tag(ident), tuple(columns)
        return lambda keys: self.lookup([digest for _, digest in keys], tag, columns, logical)

    def lookup(self, digests: Sequence[str], tag: int, columns: tuple[str, ...],
               logical: str | None = None) -> list[Row | None]:
        out: list[Row | None] = [None] * len(digests)
        pending: dict[bytes, list[int]] = {}
        for i, digest in enumerate(digests):
            pending.setdefault(bytes.fromhex(digest), []).append(i)
        self._take_snapshot()
        tried: set[int] = set()
        for src in self._near.get(logical, ()) if logical is not None else ():
            if not pending:
                break
            tried.add(src)
            self._take(src, pending, out, tag, columns)
        for listed in (False, True):  # the build's own shards and unlisted ones, then the listed
            if pending and (not listed or self._may_be_listed(pending)):
                self._scan(listed)
                self._search(pending, out, tag, columns, tried)
        return out

    def add(self, source: Source, digests: Sequence[str], ident: str) -> None:
        """The build wrote `source` with one row per tile blake3 in `digests`, all of `ident`."""
        keys = np.frombuffer(b"".join(bytes.fromhex(d)[:8] for d in digests), "<u8")
        with self._lock:
            src = self._register(source)
            if src in self._indexed:
                return
            self._indexed.add(src)
            self._table(ident_tag(ident)).add(keys, np.full(len(keys), src, np.int32))

    # --- the index --------------------------------------------------------------------------

    def _take_snapshot(self) -> None:
        """The trusted sources, taken once (what the last Manifest lists is verified then)."""
        if self._snapshot:
            return
        with self._scan_lock:
            if self._snapshot:
                return
            given = self._given
            for source in list(given() if callable(given) else given):
                with self._lock:
                    src = self._register(source)
                if source.logical is not None:
                    self._near.setdefault(source.logical, []).append(src)
            self._given = ()
            self._snapshot = True

    def _may_be_listed(self, pending: dict[bytes, list[int]]) -> bool:
        if self._listed is None:
            return True
        with self._scan_lock:
            if self._listed_keys is None:
                self._listed_keys = self._listed()
        listed = self._listed_keys
        if not len(listed):
            return False
        keys = np.frombuffer(b"".join(digest[:8] for digest in pending), "<u8")
        at = np.minimum(np.searchsorted(listed, keys), len(listed) - 1)
        return bool((listed[at] == keys).any())

    def _scan(self, listed: bool) -> None:
        """Index the unlisted (or the listed) sources by their key columns, once (sources the
        build added are indexed already)."""
        if listed in self._scanned:
            return
        with self._scan_lock:
            if listed in self._scanned:
                return
            with self._lock:
                todo = [i for i, source in enumerate(self._sources)
                        if i not in self._indexed and source.listed == listed]
            parts: dict[int, tuple[list, list]] = {}
            for src in todo:
                columns = _key_columns(self._sources[src].path)
                if columns is None:
                    continue  # gone, not a shard: its rows are computed
                keys, idents = columns
                one = len(idents) and bool((idents == idents[0]).all())  # a shard: one identity
                for tag in [int(idents[0])] if one else np.unique(idents).tolist():
                    sel = slice(None) if one else idents == tag
                    keyed = parts.setdefault(int(tag), ([], []))
                    keyed[0].append(keys[sel])
                    keyed[1].append(np.full(len(keys[sel]), src, np.int32))
            with self._lock:
                for tag, (keys, srcs) in parts.items():
                    self._table(tag).add(np.concatenate(keys), np.concatenate(srcs))
                self._indexed.update(todo)
                self.scanned += len(todo)
            self._scanned.add(listed)

    def _search(self, pending: dict[bytes, list[int]], out: list, tag: int,
                columns: tuple[str, ...], tried: set[int]) -> None:
        """Take what the index knows, from the source holding most of what is still missing
        first, each source read once."""
        with self._lock:
            table = self._tables.get(tag)
            found = table.find(list(pending)) if table is not None else {}
        while pending:
            counts: dict[int, int] = {}
            for digest in pending:
                for src in found.get(digest, ()):
                    if src not in tried:
                        counts[src] = counts.get(src, 0) + 1
            if not counts:
                return
            src = min(counts, key=lambda s: (-counts[s], s))
            tried.add(src)
            self._take(src, pending, out, tag, columns)

    def _register(self, source: Source) -> int:
        name = str(source.path)
        if name not in self._by_path:
            self._by_path[name] = len(self._sources)
            self._sources.append(source)
        return self._by_path[name]

    def _table(self, tag: int) -> _Table:
        if tag not in self._tables:
            self._tables[tag] = _Table()
        return self._tables[tag]

    # --- the rows ---------------------------------------------------------------------------

    def _take(self, src: int, pending: dict[bytes, list[int]], out: list, tag: int,
              columns: tuple[str, ...]) -> None:
        """Fill `out` with the rows of `src` that hold a pending blake3 under `tag`, from its
        verified bytes (nothing if the reader no longer vouches for them)."""
        with self._lock:
            source = self._sources[src]
            self.reads += 1
        data = source.read()
        rows = _rows(data) if data is not None else None
        if rows is None or not all(_is_value(rows.dtype, c) for c in columns):
            return
        hits = np.flatnonzero(np.ascontiguousarray(rows["ident"]).view("<u8").ravel() == tag)
        digests = np.ascontiguousarray(rows["blake3"][hits]).tobytes()
        for j, r in enumerate(hits.tolist()):
            positions = pending.pop(digests[32 * j:32 * (j + 1)], None)
            if positions:
                row = tuple(np.array(rows[c][r]) for c in columns)
                for i in positions:
                    out[i] = row


class _Table:
    """blake3 prefix -> sources, for one identity: sorted runs, the newest merged into the one
    before it while it is at least half as long (few runs, each row moved O(log n) times)."""

    def __init__(self) -> None:
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, keys: np.ndarray, srcs: np.ndarray) -> None:
        if not len(keys):
            return
        order = np.argsort(keys, kind="stable")
        self.runs.append((keys[order], srcs[order]))
        while len(self.runs) > 1 and 2 * len(self.runs[-1][0]) >= len(self.runs[-2][0]):
            (k1, s1), (k2, s2) = self.runs[-2], self.runs.pop()
            keys, srcs = np.concatenate([k1, k2]), np.concatenate([s1, s2])
            order = np.argsort(keys, kind="stable")
            self.runs[-1] = (keys[order], srcs[order])

    def find(self, digests: list[bytes]) -> dict[bytes, list[int]]:
        """blake3 -> the sources that may hold it (a prefix match: the row itself is checked)."""
        want = np.frombuffer(b"".join(d[:8] for d in digests), "<u8")
        found: dict[bytes, list[int]] = {}
        for keys, srcs in self.runs:
            lo, hi = np.searchsorted(keys, want, "left"), np.searchsorted(keys, want, "right")
            for i in np.flatnonzero(hi > lo).tolist():
                found.setdefault(digests[i], []).extend(srcs[lo[i]:hi[i]].tolist())
        return {d: sorted(set(s)) for d, s in found.items()}


# --- shard files without numpy's loader: key columns streamed, rows viewed in place -----------

def _header(f: BinaryIO) -> tuple[np.dtype, int] | None:
    """(row dtype, rows) of a 1-D structured .npy with blake3 and ident columns; f then at the
    data."""
    lead = f.read(12)
    if len(lead) < 10 or lead[:6] != b"\x93NUMPY" or lead[6:8] not in (b"\x01\x00", b"\x02\x00"):
        return None
    wide = lead[6] == 2
    size = int.from_bytes(lead[8:12] if wide else lead[8:10], "little")
    start = 12 if wide else 10
    if size > _HEADER_MAX:
        return None
    header = lead[start:] + f.read(size - (len(lead) - start))
    if len(header) != size:
        return None
    return _parse_header(lead[:start] + header)


@functools.lru_cache(maxsize=256)  # a model's shards share a handful of headers: parsed once
def _parse_header(raw: bytes) -> tuple[np.dtype, int] | None:
    from numpy.lib import format as npy

    f = io.BytesIO(raw)
    try:
        read = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}[
            npy.read_magic(f)]
        shape, fortran, dtype = read(f, max_header_size=_HEADER_MAX)
    except (ValueError, OSError, EOFError, TypeError, SyntaxError, KeyError):
        return None
    names = dtype.names or ()
    if (fortran or len(shape) != 1 or dtype.hasobject or "blake3" not in names
            or "ident" not in names or dtype.fields["blake3"][0] != _BLAKE3
            or dtype.fields["ident"][0] != _IDENT):
        return None
    return dtype, shape[0]


def _key_columns(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(blake3 prefixes, ident prefixes) of every row of the shard file at `path`, as uint64,
    read a chunk of whole rows at a time (the value columns are never kept); None if it is not a
    regular shard file (a hint: what is reused is checked again on the verified bytes)."""
    try:
        fd = os.open(path, OPEN_FLAGS)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        try:
            st = os.fstat(fd)
            head = _header(f) if stat.S_ISREG(st.st_mode) else None
            if head is None:
                return None
            dtype, n = head
            if st.st_size != f.tell() + n * dtype.itemsize:
                return None
            keyed = np.dtype({"names": ["blake3", "ident"],
                              "formats": [_BLAKE3, _IDENT],
                              "offsets": [dtype.fields["blake3"][1], dtype.fields["ident"][1]],
                              "itemsize": dtype.itemsize})
            per = max(1, _CHUNK // max(dtype.itemsize, 1))
            buf = bytearray(min(per, n) * dtype.itemsize)
            keys, idents = np.empty((n, 8), np.uint8), np.empty((n, 8), np.uint8)
            for start in range(0, n, per):
                count = min(per, n - start)
                view = memoryview(buf)[:count * dtype.itemsize]
                if f.readinto(view) != len(view):
                    return None
                rows = np.frombuffer(buf, keyed, count=count)
                keys[start:start + count] = rows["blake3"][:, :8]
                idents[start:start + count] = rows["ident"]
                del rows
        except OSError:
            return None
    return keys.view("<u8").ravel(), idents.view("<u8").ravel()


def _rows(data: bytes) -> np.ndarray | None:
    """The rows of a shard file's bytes, viewed in place (read-only), or None."""
    f = io.BytesIO(data)
    head = _header(f)
    if head is None:
        return None
    dtype, n = head
    if len(data) != f.tell() + n * dtype.itemsize:
        return None
    return np.frombuffer(data, dtype, count=n, offset=f.tell())


def _is_value(dtype: np.dtype, name: str) -> bool:
    field = (dtype.fields or {}).get(name)
    return field is not None and field[0].base == _VALUE
