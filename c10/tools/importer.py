"""`c10 import DIR SOURCE`: tiles from MBTiles or an XYZ/TMS folder, inside the request."""
from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from c10.config import load_config
from c10.errors import TileError
from c10.store import atomic
from c10.store.layout import TILE_EXTS, TILES_DIR
from c10.store.lock import BuildLock, require_cache_root
from c10.store.tiles import Scope, TileId, scan_tiles


@dataclass
class ImportResult:
    source: str
    kind: str                                        # "MBTiles", "XYZ folder" or "TMS folder"
    added: list[str] = field(default_factory=list)
    identical: int = 0                               # same bytes already in the cache: left
                                                     # untouched
    replaced: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)  # a different tile is in the cache: kept
    invalid: list[str] = field(default_factory=list)    # not JPEG/PNG/WebP: not imported
    outside: int = 0                                 # outside area.bbox/zooms: not imported
    # a folder's tiles that would fall inside the request with y counted the other way (TMS
    # for an XYZ read, XYZ for a --tms read); None for MBTiles (TMS by its spec)
    flipped: int | None = None

    @property
    def seen(self) -> int:
        return (len(self.added) + self.identical + len(self.replaced) + len(self.conflicts)
                + len(self.invalid))

    @property
    def looks_flipped(self) -> bool:
        """More of the folder's tiles fall inside the request with y flipped than as read: the
        folder most likely counts y the other way (`--tms` given or missing)."""
        return self.flipped is not None and self.flipped > self.seen


def import_tiles(root: Path, source: Path, *, tms: bool = False,
                 replace: bool = False) -> ImportResult:
    """Copy the source's tiles inside the request into tiles/; never overwrite a different tile
    unasked."""
    root = require_cache_root(root)
    config = load_config(root)
    scope = Scope(config.area.bbox, config.area.zooms)
    source = Path(source)
    if source.is_file():
        result, rows = ImportResult(str(source), "MBTiles"), mbtiles_rows(source, scope)
    elif source.is_dir():
        result = ImportResult(str(source), "TMS folder" if tms else "XYZ folder", flipped=0)
        rows = folder_rows(source, scope, tms, result)
    else:
        raise TileError(f"{source}: no such MBTiles file or tile folder; pass a .mbtiles file or a "
                        "folder of {z}/{x}/{y}.jpg|png|webp tiles")
    existing = {t.id: t.path for t in scan_tiles(root).tiles}
    with BuildLock(root):  # a build must not see tiles/ change under it
        for item in rows:
            if isinstance(item, int):
                result.outside += item
            else:
                _one(root, existing, result, *item, replace=replace)
    return result


def _one(root: Path, existing: dict, result: ImportResult, tile: TileId, data: bytes, where: str,
         *, replace: bool) -> None:
    ext = sniff(data)
    if ext is None:
        result.invalid.append(where)
        return
    rel = f"{TILES_DIR}/{tile.z}/{tile.x}/{tile.y}.{ext}"
    old = existing.get(tile)
    if old is not None and _read(root / old) == data:
        result.identical += 1
        return
    if old is not None and not replace:
        result.conflicts.append(old)
        return
    atomic.write_bytes(root / rel, data)
    if old is not None and old != rel:
        os.unlink(root / old)  # same tile under another extension: two files would be a stray
    existing[tile] = rel
    (result.replaced if old is not None else result.added).append(rel)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def sniff(data: bytes) -> str | None:
    """The tile's image format from its first bytes (MBTiles rows carry no file name)."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def mbtiles_rows(path: Path, scope: Scope) -> Iterator[tuple[TileId, bytes, str] | int]:
    """In-scope tiles of an MBTiles file as XYZ ids (rows are TMS: y = 2^z - 1 - tile_row), then the
    number of tiles outside the scope."""
    try:
        conn = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True)
        total = conn.execute("select count(*) from tiles").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise TileError(f"{path}: not an MBTiles file ({exc}); "
                        "pass a .mbtiles file with a `tiles` table or a tile folder") from None
    inside = 0
    try:
        for z, (x0, x1, y0, y1) in sorted(scope.ranges.items()):
            flip = 2 ** z - 1
            rows = conn.execute(
                "select tile_column, tile_row, tile_data from tiles where zoom_level = ? "
                "and tile_column between ? and ? and tile_row between ? and ? "
                "order by tile_column, tile_row",
                (z, x0, x1, flip - y1, flip - y0))
            for x, row, data in rows:
                inside += 1
                yield TileId(z, x, flip - row), bytes(data), f"{path.name}:{z}/{x}/{row}"
    finally:
        conn.close()
    yield total - inside


def folder_rows(path: Path, scope: Scope, tms: bool,
                tally: ImportResult | None = None) -> Iterator[tuple[TileId, bytes, str] | int]:
    """In-scope tiles of a {z}/{x}/{y}.ext folder (y from the south with tms), then the count
    outside; `tally.flipped` counts the tiles that y counted the other way puts in scope."""
    outside = 0
    for rel, z, x, y in _walk(path):
        tile = TileId(z, x, 2 ** z - 1 - y if tms else y)
        if tally is not None and TileId(z, x, y if tms else 2 ** z - 1 - y) in scope:
            tally.flipped += 1
        if tile in scope:
            yield tile, (path / rel).read_bytes(), str(path / rel)
        else:
            outside += 1
    yield outside


def _walk(path: Path) -> Iterator[tuple[str, int, int, int]]:
    for z in _numbered(path):
        for x in _numbered(path / str(z)):
            for entry in sorted(os.scandir(path / str(z) / str(x)), key=lambda e: e.name):
                stem, _, ext = entry.name.partition(".")
                if entry.is_file() and stem.isdigit() and ext.lower() in TILE_EXTS:
                    yield f"{z}/{x}/{entry.name}", z, x, int(stem)


def _numbered(path: Path) -> list[int]:
    return sorted(int(e.name) for e in os.scandir(path) if e.is_dir() and e.name.isdigit())


def summary(result: ImportResult, root: Path) -> str:
    lines = [f"c10 import: {result.seen} tile(s) of the request in {result.kind} {result.source}: "
             f"{len(result.added)} added, {result.identical} identical (skipped), "
             f"{len(result.replaced)} replaced, {len(result.conflicts)} different and kept; "
             f"{result.outside} outside "
             "area.bbox/zooms not imported"]
    lines += [f"  replaced: {rel}" for rel in result.replaced]
    lines += [f"  differs from the source, kept: {rel}" for rel in result.conflicts[:20]]
    if len(result.conflicts) > 20:
        lines.append(f"  ... and {len(result.conflicts) - 20} more")
    if result.conflicts:
        lines.append("  re-run with --replace to overwrite them with the source's tiles")
    lines += [f"  not a JPEG/PNG/WebP tile, skipped: {where}" for where in result.invalid[:20]]
    if result.looks_flipped:
        lines.append(_flip_hint(result, root))
    if result.added or result.replaced:
        lines.append(f"next: `c10 status {root}` shows what the build will redo; "
                     "then `doit build_cache`")
    return "\n".join(lines)


def _flip_hint(result: ImportResult, root: Path) -> str:
    counts = (f"{result.flipped} of its tiles fall inside area.bbox/zooms with y flipped, "
              f"{result.seen} as read")
    if result.kind == "TMS folder":
        return (f"  this folder looks like XYZ (y counted from the north), not TMS: {counts}; "
                f"re-run without --tms: `c10 import {root} {result.source}`")
    return (f"  this folder looks like TMS (y counted from the south): {counts}; re-run with "
            f"--tms: `c10 import {root} {result.source} --tms`")
