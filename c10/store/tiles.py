"""The XYZ tile store: scanning tiles/{z}/{x}/{y}.{ext}, scope by bbox and zoom, blocks of tiles."""
from __future__ import annotations

import bisect
import json
import math
import os
import time
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Iterable, NamedTuple

import mercantile

from c10.store.layout import TILE_EXTS, TILES_DIR
from c10.store.memo import read_authenticated, write_authenticated

# mercantile.tiles() nudges the east/south edges inward by this much so a bbox edge
# that falls exactly on a tile boundary does not pull in the neighbouring tile (its own
# constant: a larger one drops the tile of a bbox that overhangs a boundary by 1e-10 deg).
EDGE_EPSILON = mercantile.LL_EPSILON


class TileId(NamedTuple):
    z: int
    x: int
    y: int


class Tile(NamedTuple):
    """A tile file; a tuple so 100k of them are cheap to make and sort in canonical (z, x, y)
    order."""

    z: int
    x: int
    y: int
    path: str  # relative to the cache root, e.g. "tiles/15/19160/11066.jpg"

    @property
    def id(self) -> TileId:
        return TileId(self.z, self.x, self.y)


@dataclass(frozen=True)
class Scan:
    tiles: list[Tile]      # valid tiles in canonical (z, x, y) order
    strays: list[str]      # files under tiles/ that are not z/x/y.ext (relative paths)
    # column dir -> (its stat key, rows, strays, segments[, y runs as read]), for the next
    memo: dict | None = None
    reread: int = 0            # columns listed from disk (not taken from the memo)
    # column dir -> its tiles by y, every column of this scan (c10.store.blockstate reads them)
    columns: dict = field(default_factory=dict)
    # column dir -> {"block:by": content digest}: segments the memo vouches for (column unchanged)
    segments: dict = field(default_factory=dict)


_new_tuple = tuple.__new__

# A column whose dir changed this recently is not memoized: a second change within the file
# system's timestamp granularity would leave its mtime as it was (git's "racy" entries). Whole
# seconds (FAT, HFS+, ext3: a timestamp without a sub-second part) need RACY_NS; a file system
# with sub-second timestamps stamps from the kernel's coarse clock, one tick (1-10 ms) behind.
RACY_NS = 2_000_000_000
RACY_FINE_NS = 100_000_000
MEMO_FORMAT = 3  # 3: y runs per extension and segment digests under a MAC (2: names, 1: marshal)


def scan_tiles(root: Path, memo: dict | None = None) -> Scan:
    """List every file under root/tiles, sorting z/x/y tiles from anything else (no per-file stat).

    With `memo` (the previous Scan.memo) a column directory whose stat is unchanged is not read
    again: adding, removing or renaming a file in it changes its mtime and ctime."""
    base = Path(root) / TILES_DIR
    tiles: list[Tile] = []
    strays: list[str] = []
    if not base.is_dir():
        return Scan(tiles, strays, {} if memo is not None else None)
    fresh = {} if memo is not None else None
    columns: dict = {}
    segments: dict = {}
    reread = 0
    for z_entry in _entries(base):
        if not _is_dir(z_entry) or not _is_index(z_entry.name):
            strays.extend(_walk_all(z_entry, TILES_DIR))
            continue
        for x_entry in _entries(z_entry.path):
            prefix = f"{TILES_DIR}/{z_entry.name}"
            if not _is_dir(x_entry) or not _is_index(x_entry.name):
                strays.extend(_walk_all(x_entry, prefix))
                continue
            prefix = f"{prefix}/{x_entry.name}"
            reread += _column(int(z_entry.name), x_entry, prefix, columns, strays, memo, fresh,
                              segments)
    # canonical (z, x) order of the columns (directory names sort as strings), each sorted by y
    columns = dict(sorted(columns.items(), key=lambda item: _column_id(item[0])))
    for rows in columns.values():
        tiles += rows
    return Scan(tiles, sorted(strays), fresh, reread, columns, segments)


def _column_id(prefix: str) -> tuple[int, int]:
    _, z, x = prefix.split("/")
    return int(z), int(x)


def split_blocks(columns: dict[str, list[Tile]], scope: Scope, block: int
                 ) -> tuple[list[Tile], list[Tile], dict[tuple[int, int, int], list[Tile]]]:
    """(tiles in scope, tiles out of it, the in-scope tiles by block), each in canonical order,
    from a scan's columns: a slice per column and block row, no step per tile (10^6 a load)."""
    inside: list[Tile] = []
    outside: list[Tile] = []
    blocks: dict[tuple[int, int, int], list[Tile]] = {}
    for rows in columns.values():
        if not rows:
            continue
        z, x = rows[0].z, rows[0].x
        r = scope.ranges.get(z)
        if r is None or not r[0] <= x <= r[1]:
            outside += rows
            continue
        lo, hi = bisect.bisect_left(rows, r[2], key=_y), bisect.bisect_right(rows, r[3], key=_y)
        outside += rows[:lo]
        outside += rows[hi:]
        inside += rows[lo:hi]
        while lo < hi:
            by = rows[lo].y // block
            end = bisect.bisect_left(rows, (by + 1) * block, lo, hi, key=_y)
            blocks.setdefault((z, x // block, by), []).extend(rows[lo:end])
            lo = end
    return inside, outside, dict(sorted(blocks.items()))


def _y(tile: Tile) -> int:
    return tile.y


def read_memo(path: Path, secret: bytes | None) -> dict:
    """The scan memo saved by write_memo, or {} (missing, torn, another format, or not written
    by c10 on this host: its MAC, keyed by a secret kept outside the cache, does not match)."""
    body = read_authenticated(path, secret)
    if body is None:
        return {}
    try:
        data = json.loads(body)
        return _memo_columns(data["columns"]) if data.get("format") == MEMO_FORMAT else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _memo_columns(columns: dict) -> dict:
    """column dir -> (its stat key, rows, strays, segments), each row rebuilt from its y and
    extension as a scan makes it (so a name and its tile id always agree)."""
    out = {}
    for prefix, (key, runs, strays, segments) in columns.items():
        _, z, x = prefix.split("/")
        z, x = int(z), int(x)
        rows: list[Tile] = []
        for ext, spans in runs.items():
            if ext.lower() not in TILE_EXTS:
                raise ValueError(ext)
            name = f"{prefix}/{{}}.{ext}".format
            for y0, y1 in spans:
                if type(y0) is not int or type(y1) is not int or not 0 <= y0 <= y1:
                    raise ValueError(prefix)
                ys = range(y0, y1 + 1)
                # Tile(...) is a Python-level __new__: 10^6 of them per no-op load, so the tuples
                # are made by tuple.__new__ from C iterators instead
                rows += map(_new_tuple, repeat(Tile),
                            zip(repeat(z), repeat(x), ys, map(name, ys)))
        if len(runs) > 1:
            rows.sort()
        # the runs as read: written back unchanged while the column is (no pass over its tiles)
        out[prefix] = (tuple(key), rows, list(strays), {str(k): str(v)
                                                        for k, v in segments.items()}, runs)
    return out


def write_memo(path: Path, scan: Scan, secret: bytes, changed: bool = False) -> None:
    """Save the memo when the scan re-read a column or `changed` (new segment digests): else the
    saved one is this one. JSON of y runs per column, authenticated by `secret`."""
    if scan.memo is None or not (scan.reread or changed):
        return
    columns = {prefix: [list(entry[0]), entry[4] if len(entry) > 4 else _runs(entry[1]),
                        entry[2], entry[3]] for prefix, entry in scan.memo.items()}
    body = json.dumps({"format": MEMO_FORMAT, "columns": columns}, separators=(",", ":")).encode()
    write_authenticated(path, body, secret)


def _runs(rows: list[Tile]) -> dict[str, list[list[int]]]:
    """A column's tiles as runs of consecutive y per extension: {"jpg": [[y0, y1], ...]}."""
    out: dict[str, list[list[int]]] = {}
    for tile in rows:
        ext = tile.path.rsplit(".", 1)[1]
        spans = out.setdefault(ext, [])
        if spans and spans[-1][1] == tile.y - 1:
            spans[-1][1] = tile.y
        else:
            spans.append([tile.y, tile.y])
    return out


def _column(z: int, x_entry: os.DirEntry, prefix: str, columns: dict, strays: list,
            memo: dict | None, fresh: dict | None, segments: dict) -> int:
    """Add one column's tiles and strays, from the memo when its dir is unchanged (with the
    segment digests the memo holds for it); 1 if it was read."""
    rows: list[Tile] = []
    if memo is None:
        _scan_column(z, x_entry, prefix, rows, strays)
        columns[prefix] = rows
        return 1
    st = x_entry.stat(follow_symlinks=False)
    key = (st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_size)
    hit = memo.get(prefix)
    if hit is not None and hit[0] == key:
        segments[prefix] = hit[3]
        columns[prefix] = hit[1]
        strays.extend(hit[2])
        fresh[prefix] = hit  # unchanged since it was memoized, so not racy; its runs kept
        return 0
    column_strays: list[str] = []
    _scan_column(z, x_entry, prefix, rows, column_strays)
    columns[prefix] = rows
    strays.extend(column_strays)
    if not racy(st):
        fresh[prefix] = (key, rows, column_strays, {})
    return 1


def racy(st: os.stat_result) -> bool:
    """The directory changed too recently for its stat to prove that nothing changed since."""
    fine = st.st_mtime_ns % 1_000_000_000 or st.st_ctime_ns % 1_000_000_000
    window = min(RACY_NS, RACY_FINE_NS) if fine else RACY_NS
    return time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) <= window


def _scan_column(z: int, x_entry: os.DirEntry, prefix: str, tiles: list, strays: list) -> None:
    # The hot loop of a no-op build (100k tiles): one scandir, d_type only, no per-file stat.
    x = int(x_entry.name)
    # beyond the zoom's range: every file is a stray
    limit = 1 << z if z <= 30 and x < (1 << z) else 0
    found = []
    with os.scandir(x_entry.path) as it:
        for entry in it:
            stem, _, ext = entry.name.partition(".")
            named = ext.lower() in TILE_EXTS and _is_index(stem)
            if named and entry.is_file(follow_symlinks=False):
                found.append((int(stem), entry.name))
            else:
                strays.extend(_walk_all(entry, prefix))
    # by y, then name: of 2.jpg and 2.png the first name is the tile, the other a stray
    found.sort()
    last = -1
    for y, name in found:
        if y == last or y >= limit:
            strays.append(f"{prefix}/{name}")
        else:
            tiles.append(Tile(z, x, y, f"{prefix}/{name}"))
            last = y


def tile_of(relpath: str) -> TileId | None:
    """The tile a cache-relative path names, as scan_tiles takes it (tiles/{z}/{x}/{y}.{ext}, each
    index a canonical decimal within its zoom), or None for a name the scan calls a stray. Of two
    files of one z/x/y the scan takes the first name: the caller decides between them."""
    parts = relpath.split("/")
    if len(parts) != 4 or parts[0] != TILES_DIR:
        return None
    _, z, x, name = parts
    stem, _, ext = name.partition(".")
    if not (_is_index(z) and _is_index(x) and _is_index(stem) and ext.lower() in TILE_EXTS):
        return None
    z, x, y = int(z), int(x), int(stem)
    return TileId(z, x, y) if z <= 30 and x < (1 << z) and y < (1 << z) else None


def _entries(path) -> list[os.DirEntry]:
    with os.scandir(path) as it:
        return sorted(it, key=lambda e: e.name)


def _is_dir(entry: os.DirEntry) -> bool:
    return entry.is_dir(follow_symlinks=False)


def _is_index(name: str) -> bool:
    return name.isascii() and name.isdigit() and (name == "0" or not name.startswith("0"))


def _walk_all(entry: os.DirEntry, prefix: str) -> list[str]:
    """Every file at or below `entry`, relative to the cache root (a stray subtree)."""
    rel = f"{prefix}/{entry.name}"
    if not _is_dir(entry):
        return [rel]
    out = []
    for child in _entries(entry.path):
        out.extend(_walk_all(child, rel))
    return out or [rel + "/"]


def tile_ranges(bbox: tuple[float, float, float, float], z: int) -> tuple[int, int, int, int]:
    """Inclusive (x_min, x_max, y_min, y_max) of the zoom-z tiles that intersect bbox, as
    mercantile.tiles()."""
    lat_min, lon_min, lat_max, lon_max = bbox
    ul = mercantile.tile(lon_min, lat_max, z)
    lr = mercantile.tile(lon_max - EDGE_EPSILON, lat_min + EDGE_EPSILON, z)
    return ul.x, lr.x, ul.y, lr.y


class Scope:
    """Which tiles a request wants: zooms and, per zoom, the x/y ranges covering the bbox."""

    def __init__(self, bbox: tuple[float, float, float, float], zooms: Iterable[int]):
        self.bbox = bbox
        self.ranges = {z: tile_ranges(bbox, z) for z in zooms}

    def __contains__(self, tile: Tile | TileId) -> bool:
        r = self.ranges.get(tile.z)
        return r is not None and r[0] <= tile.x <= r[1] and r[2] <= tile.y <= r[3]

    def split(self, tiles: Iterable[Tile]) -> tuple[list[Tile], list[Tile]]:
        """(in scope, out of scope), each in the given order: one pass, no method call per tile."""
        inside, outside = [], []
        ranges = self.ranges
        for tile in tiles:
            r = ranges.get(tile[0])
            ok = r is not None and r[0] <= tile[1] <= r[1] and r[2] <= tile[2] <= r[3]
            (inside if ok else outside).append(tile)
        return inside, outside

    def expected_count(self) -> int:
        return sum((r[1] - r[0] + 1) * (r[3] - r[2] + 1) for r in self.ranges.values())

    def expected(self, z: int) -> Iterable[TileId]:
        x0, x1, y0, y1 = self.ranges[z]
        return (TileId(z, x, y) for x in range(x0, x1 + 1) for y in range(y0, y1 + 1))


def block_of(tile: Tile | TileId, block: int) -> tuple[int, int, int]:
    """The (z, bx, by) block holding a tile: `block` x `block` tiles at one zoom."""
    return tile.z, tile.x // block, tile.y // block


def group_blocks(tiles: Iterable[Tile], block: int) -> dict[tuple[int, int, int], list[Tile]]:
    """Tiles grouped by block, keys and members in canonical order."""
    blocks: dict[tuple[int, int, int], list[Tile]] = {}
    for tile in tiles:
        key = (tile[0], tile[1] // block,
               tile[2] // block)  # block_of(), inlined: 100k tiles per load
        members = blocks.get(key)
        if members is None:
            blocks[key] = members = []
        members.append(tile)
    return dict(sorted(blocks.items()))


def center_latlon(tile: Tile | TileId) -> tuple[float, float]:
    """The (lat, lon) of a tile's centre."""
    return tile_latlon(tile.z, tile.x + 0.5, tile.y + 0.5)


def tile_latlon(z: int, x: float, y: float) -> tuple[float, float]:
    """(lat, lon) of the point (x, y) in tile units at zoom z (y counted from the north).

    Tile units are linear in Web-Mercator metres; mercantile projects those (its ul() takes only
    whole tiles in its next major version)."""
    n = 2.0 ** z
    point = mercantile.lnglat(x / n * EQUATOR_M - EQUATOR_M / 2,
                              EQUATOR_M / 2 - y / n * EQUATOR_M)
    return point.lat, point.lng


def latlon_tile(z: int, lat: float, lon: float) -> tuple[float, float]:
    """The inverse of tile_latlon: (x, y) in tile units at zoom z."""
    n = 2.0 ** z
    mx, my = mercantile.xy(lon, lat)
    return (mx + EQUATOR_M / 2) / EQUATOR_M * n, (EQUATOR_M / 2 - my) / EQUATOR_M * n


EARTH_RADIUS_M = 6378137.0  # the WGS 84 semi-major axis Web Mercator is defined on
EQUATOR_M = 2 * math.pi * EARTH_RADIUS_M
