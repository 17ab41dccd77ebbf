"""`c10 import`: MBTiles (TMS rows) and XYZ/TMS folders into tiles/, inside the request, never
silently."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from c10.cli import main as c10_main
from c10.errors import BuildLockHeldError
from c10.store.lock import BuildLock
from c10.store.tiles import Scope
from c10.tools import synth
from c10.tools.importer import import_tiles, sniff
from c10.tools.project import init_cache

# A request that is 3 tiles wide and 2 high at z15 (asymmetric, so a swapped or mirrored axis
# lands tiles in the wrong place), and a source that also holds tiles outside it and a zoom more.
REQUEST = (50.444, 30.500, 50.455, 30.525)
SOURCE = (50.430, 30.490, 50.470, 30.560)


@pytest.fixture(scope="module")
def xyz(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("xyz")
    synth.make_tiles(d, SOURCE, (15, 16), size=32)
    return d


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in folder.rglob("*") if p.is_file()}


def tms_copy(xyz: Path, out: Path) -> Path:
    for rel, data in files(xyz).items():
        z, x, name = rel.split("/")
        y = int(name.split(".")[0])
        target = out / z / x / f"{2 ** int(z) - 1 - y}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return out


def mbtiles(xyz: Path, path: Path) -> Path:
    """An MBTiles file as a tile server writes it: TMS rows, a metadata table."""
    conn = sqlite3.connect(path)
    conn.execute("create table metadata (name text, value text)")
    conn.execute("insert into metadata values ('format', 'jpg')")
    conn.execute("create table tiles (zoom_level integer, tile_column integer, tile_row integer, "
                 "tile_data blob)")
    for rel, data in files(xyz).items():
        z, x, name = rel.split("/")
        row = 2 ** int(z) - 1 - int(name.split(".")[0])
        conn.execute("insert into tiles values (?, ?, ?, ?)", (int(z), int(x), row, data))
    conn.commit()
    conn.close()
    return path


def empty_cache(root: Path) -> Path:
    root.mkdir()
    init_cache(root, bbox=str(list(REQUEST)), zooms="[15]")
    return root


def expected_subset(xyz: Path) -> dict[str, bytes]:
    scope = Scope(REQUEST, (15,))
    x0, x1, y0, y1 = scope.ranges[15]
    assert (x1 - x0 + 1, y1 - y0 + 1) == (3, 2)
    return {f"tiles/{rel}": data for rel, data in files(xyz).items()
            if rel.startswith("15/") and x0 <= int(rel.split("/")[1]) <= x1
            and y0 <= int(rel.split("/")[2].split(".")[0]) <= y1}


def test_mbtiles_and_folders_give_the_same_tiles(xyz, tmp_path):
    want = expected_subset(xyz)
    source = mbtiles(xyz, tmp_path / "area.mbtiles")
    results = {}
    for name, src, tms in (("mbtiles", source, False), ("xyz", xyz, False),
                           ("tms", tms_copy(xyz, tmp_path / "tms-source"), True)):
        root = empty_cache(tmp_path / name)
        results[name] = import_tiles(root, src, tms=tms)
        got = {k: v for k, v in files(root).items() if k.startswith("tiles/")}
        assert got == want, name
    total = len(files(xyz))
    for result in results.values():
        assert len(result.added) == len(want) == 6 and result.outside == total - 6


def test_reimport_changes_nothing_and_conflicts_are_never_silent(xyz, tmp_path, capsys):
    root = empty_cache(tmp_path / "cache")
    source = mbtiles(xyz, tmp_path / "area.mbtiles")
    assert c10_main(["import", str(root), str(source)]) == 0
    before = {p: p.stat().st_mtime_ns for p in (root / "tiles").rglob("*.jpg")}
    again = import_tiles(root, source)
    assert (again.added, again.identical, again.replaced, again.conflicts) == ([], 6, [], [])
    assert {p: p.stat().st_mtime_ns for p in (root / "tiles").rglob("*.jpg")} == before

    mine = sorted(before)[2]
    mine.write_bytes(b"\xff\xd8\xff operator's own tile")
    capsys.readouterr()
    assert c10_main(["import", str(root), str(source)]) == 1  # kept, and said so
    out = capsys.readouterr().out
    assert (f"differs from the source, kept: {mine.relative_to(root).as_posix()}" in out
            and "--replace" in out)
    assert mine.read_bytes() == b"\xff\xd8\xff operator's own tile"
    replaced = import_tiles(root, source, replace=True)
    assert (replaced.replaced == [mine.relative_to(root).as_posix()]
            and mine.read_bytes()[:3] == b"\xff\xd8\xff")
    assert mine.read_bytes() == (xyz / mine.relative_to(root / "tiles")).read_bytes()


def test_other_format_replaces_the_old_file_and_bad_data_is_reported(tmp_path):
    root = empty_cache(tmp_path / "cache")
    src = tmp_path / "src"
    scope = Scope(REQUEST, (15,))
    x0, _, y0, _ = scope.ranges[15]
    (root / f"tiles/15/{x0}").mkdir(parents=True)
    (root / f"tiles/15/{x0}/{y0}.jpg").write_bytes(b"\xff\xd8\xff old")
    (src / f"15/{x0}").mkdir(parents=True)
    (src / f"15/{x0}/{y0}.png").write_bytes(b"\x89PNG\r\n\x1a\n new")
    (src / f"15/{x0}/{y0 + 1}.jpg").write_bytes(b"<html>404</html>")
    result = import_tiles(root, src, replace=True)
    assert result.replaced == [f"tiles/15/{x0}/{y0}.png"] and len(result.invalid) == 1
    assert sorted(p.name for p in (root / f"tiles/15/{x0}").iterdir()) == [f"{y0}.png"]


def test_import_waits_for_no_build(xyz, tmp_path):
    root = empty_cache(tmp_path / "cache")
    holder = BuildLock(root)
    holder.acquire()
    try:
        with pytest.raises(BuildLockHeldError):
            import_tiles(root, xyz)
    finally:
        holder.release()
    assert not (root / "tiles").exists()


def test_a_tms_folder_imported_as_xyz_says_so_and_suggests_tms(xyz, tmp_path, capsys):
    tms = tms_copy(xyz, tmp_path / "tms-source")
    root = empty_cache(tmp_path / "cache")
    assert c10_main(["import", str(root), str(tms)]) == 1  # nothing of the request: never silent
    out = capsys.readouterr().out
    assert "looks like TMS" in out and f"`c10 import {root} {tms} --tms`" in out
    assert "6 of its tiles fall inside area.bbox/zooms with y flipped, 0 as read" in out
    assert not (root / "tiles").exists()
    assert c10_main(["import", str(root), str(tms), "--tms"]) == 0
    assert "looks like" not in capsys.readouterr().out


def test_an_xyz_folder_imported_with_tms_says_so(xyz, tmp_path, capsys):
    root = empty_cache(tmp_path / "cache")
    assert c10_main(["import", str(root), str(xyz), "--tms"]) == 1
    out = capsys.readouterr().out
    assert "looks like XYZ" in out and "re-run without --tms" in out
    assert import_tiles(root, xyz).looks_flipped is False  # as XYZ: no hint
    assert import_tiles(root, mbtiles(xyz, tmp_path / "a.mbtiles")).flipped is None


def test_sniff():
    assert [sniff(b) for b in (b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n", b"RIFF\0\0\0\0WEBPVP8 ",
                               b"\x1f\x8b")] \
        == ["jpg", "png", "webp", None]
