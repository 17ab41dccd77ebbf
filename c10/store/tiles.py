"""The XYZ tile store: scanning tiles/{z}/{x}/{y}.{ext}, scope by bbox and zoom, blocks of tiles."""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
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
    memo: dict | None = None   # column dir -> (its stat key, rows, strays), for the next scan
    reread: int = 0            # columns listed from disk (not taken from the memo)


# A column whose dir changed this recently is not memoized: a second change within the file
# system's timestamp granularity would leave its mtime as it was (git's "racy" entries).
RACY_NS = 2_000_000_000
MEMO_FORMAT = 2  # 2: JSON of file names under a MAC (1 was marshal)
MEMO_MIN_REREAD = 16


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
            reread += _column(int(z_entry.name), x_entry, f"{prefix}/{x_entry.name}", tiles,
                              strays, memo, fresh)
    tiles.sort()
    return Scan(tiles, sorted(strays), fresh, reread)


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
    """column dir -> (its stat key, rows, strays), each row rebuilt from its file name as a scan
    makes it (so a name and its tile id always agree)."""
    out = {}
    for prefix, (key, names, strays) in columns.items():
        _, z, x = prefix.split("/")
        z, x = int(z), int(x)
        rows = []
        for name in names:
            stem, _, ext = name.partition(".")
            if not (_is_index(stem) and ext.lower() in TILE_EXTS):
                raise ValueError(name)
            rows.append((z, x, int(stem), f"{prefix}/{name}"))
        out[prefix] = (tuple(key), rows, list(strays))
    return out


def write_memo(path: Path, scan: Scan, secret: bytes) -> None:
    """Save the memo when the scan had to read at least MEMO_MIN_REREAD columns: rewriting a memo of
    100k tiles to spare a few directory reads next time costs more than it saves (a torn or
    stale-format memo is only re-read). JSON of file names, authenticated by `secret`."""
    if scan.memo is None or scan.reread < MEMO_MIN_REREAD:
        return
    columns = {prefix: [list(key), [row[3].rsplit("/", 1)[1] for row in rows], strays]
               for prefix, (key, rows, strays) in scan.memo.items()}
    body = json.dumps({"format": MEMO_FORMAT, "columns": columns}, separators=(",", ":")).encode()
    write_authenticated(path, body, secret)


def _column(z: int, x_entry: os.DirEntry, prefix: str, tiles: list, strays: list,
            memo: dict | None, fresh: dict | None) -> int:
    """Add one column's tiles and strays, from the memo when its dir is unchanged; 1 if it was
    read."""
    if memo is None:
        _scan_column(z, x_entry, prefix, tiles, strays)
        return 1
    st = x_entry.stat(follow_symlinks=False)
    key = (st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_size)
    hit = memo.get(prefix)
    if hit is not None and hit[0] == key:
        rows, column_strays, read = hit[1], hit[2], 0
    else:
        rows, column_strays, read = [], [], 1
        _scan_column(z, x_entry, prefix, rows, column_strays)
    tiles.extend(map(Tile._make, rows))
    strays.extend(column_strays)
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > RACY_NS:
        fresh[prefix] = (key, [tuple(t) for t in rows] if read else rows, column_strays)
    return read


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
