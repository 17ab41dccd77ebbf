"""Retrieval windows (shards.stride) in real doit builds: which window shards a changed or removed
tile re-runs and which rows it re-embeds, reproducible bytes, stride 1 as a cache without the key,
the id map in 1/div tile, and windows through the Manifest, verify and pack."""
from __future__ import annotations

import datetime as dt
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import build, built, current, current_files, executed, make_cache, plan_of
from listing import listed_files
from PIL import Image

from c10.features.preprocess import decode
from c10.features.shards import read_shard
from c10.features.window_grid import Window
from c10.features.windows import window_pixels
from c10.query.flight import FlightCache
from c10.tools.pack import pack
from c10.trust.keys import load_trusted_keys
from c10.trust.verify import verify_cache

pytestmark = pytest.mark.timeout(120)


def with_stride(root: Path, stride: str) -> Path:
    toml = root / "c10.toml"
    toml.write_text(re.sub(r"(?m)^block = (\d+)$", rf"block = \1\nstride = {stride}",
                           toml.read_text(), count=1))
    return root


def outputs(root: Path) -> dict[str, bytes]:
    return {rel: p.read_bytes() for top in ("shards", "index")
            for rel, p in current_files(root, top).items()}


def window_rows(root: Path) -> dict[tuple[int, int], np.ndarray]:
    """(X, Y) in half tiles -> descriptor of every window row of the global model."""
    out = {}
    for rel, path in current_files(root, "shards/global").items():
        if rel.endswith(".windows.npy"):
            out |= {(int(r["x"]), int(r["y"])): r["desc"].copy() for r in read_shard(path)}
    return out


def tile_ids(root: Path) -> set[tuple[int, int]]:
    return {(int(p.parent.name), int(p.stem)) for p in (root / "tiles/15").rglob("*.jpg")}


def covers(window: tuple[int, int], tile: tuple[int, int], div: int = 2) -> bool:
    """Whether the one-tile window with top-left (X/div, Y/div) overlaps `tile`'s square."""
    return all(t * div - div < w < t * div + div for w, t in zip(window, tile))


def expected_windows(tiles: set[tuple[int, int]], div: int = 2) -> set[tuple[int, int]]:
    """Every off-grid (X, Y) whose covered tiles are all present."""
    out = set()
    for x, y in tiles:
        for ox in range(div):
            for oy in range(div):
                if not (ox or oy):
                    continue
                need = {(x + dx, y + dy) for dx in {0, int(ox > 0)} for dy in {0, int(oy > 0)}}
                if need <= tiles:
                    out.add((x * div + ox, y * div + oy))
    return out


def task_values(root: Path, task: str) -> dict:
    import sqlite3

    with sqlite3.connect(root / ".c10/doit.sqlite") as db:
        (data,) = db.execute("select task_data from doit where task_id = ?", (task,)).fetchone()
    return json.loads(data)["_values_:"]


@pytest.fixture
def windowed(tmp_path, inputs, operator_key) -> Path:
    return with_stride(make_cache(tmp_path / "cache", inputs, operator_key), "0.5")


def test_windows_are_indexed_in_half_tiles_and_fly(windowed, operator_key, tmp_path, capsys):
    built(windowed, capsys)
    tiles = tile_ids(windowed)
    windows = window_rows(windowed)
    assert set(windows) == expected_windows(tiles) and len(windows) > 2 * len(tiles)
    ids = read_shard(current(windowed, "index/global.ids.npy"))
    rows = {(int(r["x"]), int(r["y"])) for r in ids}
    assert len(ids) == len(rows) == len(tiles) + len(windows)
    assert rows == {(2 * x, 2 * y) for x, y in tiles} | set(windows)
    assert [tuple(r) for r in ids] == sorted(tuple(r) for r in ids)  # canonical (z, x, y) order
    # every window shard is listed as a shard; the runtime spec signs the id map's unit
    manifest = json.loads((windowed / "Manifest.json").read_bytes())
    listed = {f["path"]: f["kind"] for f in manifest["files"]}
    shards = [p for p in listed if ".windows." in p]
    assert len(shards) == len(plan_of(windowed).plans["global"].windows) > 1
    assert {listed[p] for p in shards} == {"shard"}
    trusted = load_trusted_keys([operator_key[1]])
    now = dt.datetime.now(dt.timezone.utc)
    verify_cache(windowed, trusted=trusted, now=now, state_path=None)
    image = tmp_path / "image"
    result = pack(windowed, image, trusted=trusted, now=now)
    assert result.files == len(listed_files(windowed))
    assert all((image / p).read_bytes() == (windowed / p).read_bytes() for p in shards)
    cache = FlightCache.open(image, [operator_key[1]], full=True, airborne=True)
    assert cache.model().index.div == 2
    searcher = cache.searcher()[0]
    assert searcher.div == 2
    # a window's row is its mosaic cut, embedded as the aircraft embeds a frame (and as a tile)
    (x, y), desc = sorted(windows.items())[len(windows) // 2]
    tiles_of = {t.id: t for t in plan_of(windowed).tiles}
    covered = tuple(tiles_of[(15, x // 2 + dx, y // 2 + dy)]
                    for dy in sorted({0, y % 2}) for dx in sorted({0, x % 2}))
    cut = window_pixels(Window(15, x, y, covered), 2, lambda t: decode(windowed / t.path))
    assert np.allclose(searcher.embed([Image.fromarray(cut)])[0], desc, atol=1e-5)


def test_a_changed_tile_reembeds_exactly_the_windows_that_contain_it(windowed, capsys):
    built(windowed, capsys)
    tiles = tile_ids(windowed)
    # a tile with all eight neighbours, on the corner of its block: windows of four blocks hold it
    x, y = next((x, y) for x, y in sorted(tiles) if x % 4 == 0 and y % 4 == 0
                and all((x + dx, y + dy) in tiles for dx in (-1, 0, 1) for dy in (-1, 0, 1)))
    before = window_rows(windowed)
    path = windowed / f"tiles/15/{x}/{y}.jpg"
    img = Image.open(path).convert("RGB").transpose(Image.Transpose.ROTATE_180)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    path.write_bytes(buf.getvalue())
    code, out = build(windowed, capsys)
    assert code == 0, out
    holding = {w for w in before if covers(w, (x, y))}
    assert len(holding) == 8
    blocks = {(wx // 2 // 4, wy // 2 // 4) for wx, wy in holding}
    assert blocks == {(x // 4 - i, y // 4 - j) for i in (0, 1) for j in (0, 1)}
    ran = executed(out)
    assert sorted(t for t in ran if t.endswith(".windows")) == sorted(
        f"shards:global/15/{bx}-{by}.windows" for bx, by in blocks)
    assert [t for t in ran if not t.endswith(".windows")] == [
        f"shards:global/15/{x // 4}-{y // 4}", "index:global", "coverage", "manifest"]
    values = [task_values(windowed, f"shards:global/15/{bx}-{by}.windows") for bx, by in blocks]
    assert sum(v["embedded"] for v in values) == len(holding)
    assert sum(v["embedded"] + v["reused"] for v in values) == sum(v["windows"] for v in values)
    after = window_rows(windowed)
    assert after.keys() == before.keys()
    assert {w for w in after if not np.array_equal(after[w], before[w])} == holding
    assert executed(build(windowed, capsys)[1]) == ["coverage"]


def test_a_removed_tile_takes_its_windows_and_a_stride_change_reembeds_no_tile(windowed, capsys):
    built(windowed, capsys)
    tiles = tile_ids(windowed)
    x, y = sorted(tiles)[len(tiles) // 2]
    (windowed / f"tiles/15/{x}/{y}.jpg").unlink()
    built(windowed, capsys)
    assert set(window_rows(windowed)) == expected_windows(tiles - {(x, y)})
    report = json.loads((windowed / ".c10/report.json").read_bytes())
    assert report["descriptors_generated"] == 0  # what is left of every window shard is reused
    # back to tiles only: no window shard, tile ids, the index rebuilt from the same tile rows
    toml = windowed / "c10.toml"
    toml.write_text(toml.read_text().replace("stride = 0.5", "stride = 1"))
    code, out = build(windowed, capsys)
    assert code == 0, out
    assert executed(out) == ["index:global", "coverage", "manifest"]
    assert not [rel for rel in current_files(windowed, "shards") if ".windows" in rel]
    assert not list((windowed / "shards").rglob("*.windows.*.npy"))
    ids = read_shard(current(windowed, "index/global.ids.npy"))
    assert {(int(r["x"]), int(r["y"])) for r in ids} == tiles - {(x, y)}


def test_two_clean_windowed_builds_are_byte_identical(tmp_path, inputs, operator_key, capsys):
    roots = [with_stride(make_cache(tmp_path / name, inputs, operator_key), "0.5")
             for name in ("a", "b")]
    for root in roots:
        code, out = build(root, capsys, "-n", "2", "-P", "thread", "build_cache")
        assert code == 0, out
    a, b = (outputs(root) for root in roots)
    assert a == b and any(".windows" in rel for rel in a)


def test_stride_1_is_a_cache_without_the_key(tmp_path, inputs, operator_key, capsys):
    plain = make_cache(tmp_path / "plain", inputs, operator_key)
    one = with_stride(make_cache(tmp_path / "one", inputs, operator_key), "1")
    for root in (plain, one):
        built(root, capsys)
    assert outputs(plain) == outputs(one) and not any(".windows" in r for r in outputs(one))
    runtime = [json.loads((root / "Manifest.json").read_bytes())["runtime"] for root in (plain,
                                                                                         one)]
    assert runtime[0] == runtime[1] and runtime[0]["models"]["global"]["index"]["div"] == 1
    assert plan_of(plain).config.signed_request() == plan_of(one).config.signed_request()


def test_a_block_size_change_reuses_every_window_row(windowed, capsys):
    built(windowed, capsys)
    before = window_rows(windowed)
    toml = windowed / "c10.toml"
    toml.write_text(re.sub(r"(?m)^block = 4$", "block = 8", toml.read_text()))
    built(windowed, capsys)
    report = json.loads((windowed / ".c10/report.json").read_bytes())
    assert report["descriptors_generated"] == 0  # windows found by key in other blocks' shards
    after = window_rows(windowed)
    assert after.keys() == before.keys()
    assert all(np.array_equal(after[w], before[w]) for w in before)
