"""Tile store scanning, scope and block math."""
from pathlib import Path

import mercantile
from hypothesis import given, settings
from hypothesis import strategies as st

from c10.store.tiles import (
    Scope,
    Tile,
    TileId,
    block_of,
    center_latlon,
    group_blocks,
    scan_tiles,
    tile_ranges,
)


@settings(max_examples=200, deadline=None)
@given(lat=st.floats(-80, 79), lon=st.floats(-179, 178), dlat=st.floats(1e-4, 0.5),
       dlon=st.floats(1e-4, 0.5), z=st.integers(0, 18))
def test_tile_ranges_match_mercantile(lat, lon, dlat, dlon, z):
    bbox = (lat, lon, lat + dlat, lon + dlon)
    want = {(t.x, t.y) for t in mercantile.tiles(lon, lat, lon + dlon, lat + dlat, [z])}
    scope = Scope(bbox, [z])
    x0, x1, y0, y1 = tile_ranges(bbox, z)
    assert {(x, y) for x in range(x0, x1 + 1) for y in range(y0, y1 + 1)} == want
    assert scope.expected_count() == len(want)


@given(z=st.integers(0, 20), data=st.data())
def test_center_is_inside_its_tile(z, data):
    x = data.draw(st.integers(0, 2 ** z - 1))
    y = data.draw(st.integers(0, 2 ** z - 1))
    lat, lon = center_latlon(TileId(z, x, y))
    assert mercantile.tile(lon, lat, z) == mercantile.Tile(x, y, z)


def _touch(root: Path, rel: str) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(b"x")


def test_scan_sorts_tiles_and_reports_strays(tmp_path):
    for rel in ["tiles/15/3/2.jpg", "tiles/15/3/10.png", "tiles/14/1/1.webp",
                "tiles/15/3/notes.txt", "tiles/15/03/1.jpg", "tiles/15/3/2.png", "tiles/x/1/1.jpg",
                "tiles/15/3/99999.jpg", "tiles/README"]:
        _touch(tmp_path, rel)
    scan = scan_tiles(tmp_path)
    assert [(t.z, t.x, t.y) for t in scan.tiles] == [(14, 1, 1), (15, 3, 2), (15, 3, 10)]
    # 2.png duplicates 2.jpg; 99999 is beyond 2**15; 03 is not canonical
    assert scan.strays == sorted(["tiles/15/3/notes.txt", "tiles/15/03/1.jpg", "tiles/15/3/2.png",
                                  "tiles/x/1/1.jpg", "tiles/15/3/99999.jpg", "tiles/README"])


def test_blocks_group_by_zoom_and_block():
    tiles = [Tile(15, x, y, f"tiles/15/{x}/{y}.jpg") for x in (0, 15, 16) for y in (0, 17)]
    blocks = group_blocks(tiles, 16)
    assert list(blocks) == [(15, 0, 0), (15, 0, 1), (15, 1, 0), (15, 1, 1)]
    assert block_of(TileId(15, 16, 17), 16) == (15, 1, 1)
    assert [t.x for t in blocks[(15, 0, 0)]] == [0, 15]


def _ids(scan):
    return [(t.z, t.x, t.y) for t in scan.tiles]


def test_scan_memo_skips_unchanged_columns_and_sees_every_change(tmp_path, monkeypatch):
    import c10.store.tiles as tiles_mod

    for rel in ["tiles/15/3/2.jpg", "tiles/15/3/10.png", "tiles/15/4/1.jpg",
                "tiles/15/4/notes.txt"]:
        _touch(tmp_path, rel)
    assert "tiles/15/3" not in scan_tiles(tmp_path, {}).memo  # changed just now: not trusted yet
    monkeypatch.setattr(tiles_mod, "RACY_NS", 0)
    first = scan_tiles(tmp_path, {})
    assert first.reread == 2 and set(first.memo) == {"tiles/15/3", "tiles/15/4"}
    again = scan_tiles(tmp_path, first.memo)
    assert (again.reread == 0 and again.tiles == first.tiles
            and again.strays == first.strays == ["tiles/15/4/notes.txt"])
    assert all(type(t) is Tile for t in again.tiles)
    _touch(tmp_path, "tiles/15/3/4.jpg")
    (tmp_path / "tiles/15/4/1.jpg").unlink()
    third = scan_tiles(tmp_path, again.memo)
    assert third.reread == 2 and _ids(third) == [(15, 3, 2), (15, 3, 4), (15, 3, 10)]
    plain = scan_tiles(tmp_path)
    assert (third.tiles, third.strays) == (plain.tiles, plain.strays) and plain.memo is None


def test_scan_memo_round_trips_and_a_torn_one_is_ignored(tmp_path, monkeypatch):
    import c10.store.tiles as tiles_mod

    secret = b"s" * 32
    monkeypatch.setattr(tiles_mod, "RACY_NS", 0)
    for rel in ["tiles/15/3/2.jpg", "tiles/15/3/3.jpg", "tiles/15/3/4.png", "tiles/15/3/7.jpg",
                "tiles/15/4/1.webp"]:
        _touch(tmp_path, rel)
    path = tmp_path / ".c10" / "memo"
    scan = scan_tiles(tmp_path, {})
    scan.memo["tiles/15/3"][3]["4:0"] = "ab" * 32  # a segment digest rides along
    tiles_mod.write_memo(path, scan, secret)
    again = scan_tiles(tmp_path, tiles_mod.read_memo(path, secret))
    read = tiles_mod.read_memo(path, secret)
    assert {prefix: entry[:4] for prefix, entry in read.items()} == scan.memo
    assert again.reread == 0
    # the runs as read ride along, and are what an unchanged column writes back
    assert {prefix: entry[4] for prefix, entry in read.items()} == {
        prefix: tiles_mod._runs(entry[1]) for prefix, entry in scan.memo.items()}
    assert again.tiles == scan.tiles and again.segments["tiles/15/3"] == {"4:0": "ab" * 32}
    path.unlink()
    tiles_mod.write_memo(path, again, secret)
    assert not path.exists()  # nothing re-read, no new digest: the saved memo is this one
    assert tiles_mod.read_memo(path, b"t" * 32) == {}  # another host's (or no) secret
    tiles_mod.write_memo(path, scan, secret)
    path.write_bytes(path.read_bytes()[:20])
    assert tiles_mod.read_memo(path, secret) == {}


def test_a_forged_scan_memo_is_ignored(tmp_path, monkeypatch):
    """The memo is a hint an attacker of the cache can write: one that hides a smuggled file in
    tiles/ or names a tile that is not there fails its MAC and the columns are listed again."""
    import json

    import blake3

    import c10.store.tiles as tiles_mod

    secret = b"s" * 32
    monkeypatch.setattr(tiles_mod, "RACY_NS", 0)
    for x in range(3, 6):
        _touch(tmp_path, f"tiles/15/{x}/2.jpg")
    path = tmp_path / ".c10" / "memo"
    tiles_mod.write_memo(path, scan_tiles(tmp_path, {}), secret)
    _touch(tmp_path, "tiles/15/3/evil.sh")
    mac, _, body = path.read_bytes().partition(b"\n")
    data = json.loads(body)
    data["columns"]["tiles/15/3"][1]["jpg"].append([9, 9])  # a tile that is not there
    forged = json.dumps(data).encode()
    for mac in (mac, blake3.blake3(forged).hexdigest().encode()):  # the old MAC, an unkeyed one
        path.write_bytes(mac + b"\n" + forged)
        memo = tiles_mod.read_memo(path, secret)
        assert memo == {}
        scan = scan_tiles(tmp_path, memo)
        assert "tiles/15/3/evil.sh" in scan.strays and (15, 3, 9) not in _ids(scan)


def test_split_blocks_is_scope_split_then_group_blocks(tmp_path):
    """The load's one pass per column gives what a pass per tile gives: scope, order, blocks."""
    import random

    from c10.store.tiles import Scope, group_blocks, split_blocks

    rng = random.Random(0)
    scope = Scope((50.43, 30.49, 50.47, 30.56), (14, 15))
    x0, x1, y0, y1 = scope.ranges[15]
    for _ in range(300):
        z = rng.choice((14, 15, 16))
        x, y = rng.randint(x0 - 5, x1 + 5) >> (15 - z if z < 15 else 0), rng.randint(y0 - 5, y1 + 5)
        _touch(tmp_path, f"tiles/{z}/{x}/{y}.{rng.choice(('jpg', 'png'))}")
    scan = scan_tiles(tmp_path)
    inside, outside, blocks = split_blocks(scan.columns, scope, 4)
    assert (inside, outside) == scope.split(scan.tiles) and inside and outside
    assert blocks == group_blocks(inside, 4) and list(blocks) == sorted(blocks)
    assert scan.tiles == sorted(scan.tiles)


def test_a_directory_is_racy_for_its_file_systems_timestamp_granularity():
    """Whole-second timestamps leave a column untrusted for 2 s; sub-second ones for a few of
    the kernel's clock ticks, so a build right after a copy still memoizes the copied columns."""
    import time
    from types import SimpleNamespace

    from c10.store.tiles import racy

    def aged(seconds: float, whole: bool) -> SimpleNamespace:
        ns = time.time_ns() - int(seconds * 1e9)
        ns -= ns % 1_000_000_000 if whole else 0
        ns += 0 if whole or ns % 1_000_000_000 else 1
        return SimpleNamespace(st_mtime_ns=ns, st_ctime_ns=ns)

    assert racy(aged(0.01, whole=False)) and not racy(aged(0.5, whole=False))
    assert racy(aged(1.0, whole=True)) and not racy(aged(3.5, whole=True))
