"""Shard staleness decided from the column directories the scan stats (no file_dep per tile): what
the default sees, what it does not (an in-place rewrite), and the full-stat mode that does."""
from __future__ import annotations

import json
import os
import shutil

import blake3
import pytest
from conftest import build, built, executed

import c10.store.tiles as tiles_mod
from c10.cli import main as c10_main
from c10.rules.driver import build_status
from c10.store.layout import SCAN_MEMO
from c10.tools.status import CALLABLES, plan


@pytest.fixture(autouse=True)
def trusted_columns(monkeypatch):
    """A column changed within 2 s is never memoized (mtime granularity); the tests change tiles
    well within that, so the memo would never vouch for a column: trust it at once instead."""
    monkeypatch.setattr(tiles_mod, "RACY_NS", 0)


def _tiles(cache):
    return sorted((cache / "tiles/15").rglob("*.jpg"))


def _block(tile) -> str:
    return f"shards:global/15/{int(tile.parent.name) // 4}-{int(tile.stem) // 4}"


def _verify(cache, pub, tmp_path) -> int:
    return c10_main(["verify", str(cache), "--trusted-keys", str(pub), "--state",
                     str(tmp_path / "state.json")])


def _stale(cache, full=False) -> dict[str, list[str]]:
    return {s["name"]: s["why"] for s in plan(build_status(cache, full=full)) if s["run"]}


def _rewrite_in_place(tile, data: bytes) -> None:
    """`cp` over a tile: same name and inode, no rename, so its directory's stat is unchanged."""
    column = os.stat(tile.parent)
    with open(tile, "r+b") as f:
        f.truncate(0)
        f.write(data)
    assert os.stat(tile.parent).st_mtime_ns == column.st_mtime_ns


def test_an_in_place_rewrite_is_missed_by_default_and_caught_by_the_full_mode(
        cache, capsys, pub, tmp_path, monkeypatch):
    built(cache, capsys)
    tiles = _tiles(cache)
    victim = tiles[20]
    _rewrite_in_place(victim, tiles[0].read_bytes())
    # the documented miss: the column directory did not change, so nothing is re-checked
    code, out = build(cache, capsys)
    assert code == 0 and executed(out) == ["coverage"]
    assert set(_stale(cache)) == {"coverage"}
    # `c10 verify` hashes every listed file: it refuses the cache until a full build
    assert _verify(cache, pub, tmp_path) != 0
    said = capsys.readouterr()
    assert "C10_FULL_STAT=1 doit build_cache" in said.out + said.err  # the fix it names
    assert _stale(cache, full=True)[_block(victim)] == [CALLABLES["tiles_current"]]
    assert c10_main(["status", str(cache), "--full"]) == 1 and _block(victim) in \
        capsys.readouterr().out
    monkeypatch.setenv("C10_FULL_STAT", "1")
    code, out = build(cache, capsys)
    assert code == 0 and executed(out) == [_block(victim), "index:global", "coverage", "manifest"]
    monkeypatch.delenv("C10_FULL_STAT")
    assert _verify(cache, pub, tmp_path) == 0
    code, out = build(cache, capsys)  # the full build refreshed the memo: a plain no-op again
    assert code == 0 and executed(out) == ["coverage"]


@pytest.mark.parametrize("change", ["add", "remove", "rename_over"])
def test_added_removed_and_renamed_over_tiles_are_caught_by_default(cache, capsys, tmp_path,
                                                                    change):
    tiles = _tiles(cache)
    victim = tiles[5]
    if change == "add":  # built without it, then it arrives
        shutil.move(victim, tmp_path / "t.jpg")
    built(cache, capsys)
    if change == "add":
        shutil.move(tmp_path / "t.jpg", victim)
    elif change == "remove":
        shutil.move(victim, tmp_path / "t.jpg")
    else:  # new bytes written beside it, then renamed over it (what `c10 import` does)
        (tmp_path / "new.jpg").write_bytes(tiles[0].read_bytes())
        os.replace(tmp_path / "new.jpg", victim)
    assert _stale(cache)[_block(victim)] == [CALLABLES["tiles_current"]]
    code, out = build(cache, capsys)
    assert code == 0 and executed(out) == [_block(victim), "index:global", "coverage", "manifest"]
    code, out = build(cache, capsys)
    assert code == 0 and executed(out) == ["coverage"]


def test_a_touch_costs_a_hash_not_a_rebuild(cache, capsys, tmp_path):
    """A rename that brings back the same bytes (a re-download): the column is re-read and the
    tile re-hashed; its content key is unchanged, so nothing runs."""
    built(cache, capsys)
    victim = _tiles(cache)[7]
    shutil.copy2(victim, tmp_path / "same.jpg")
    os.replace(tmp_path / "same.jpg", victim)
    code, out = build(cache, capsys)
    assert code == 0 and executed(out) == ["coverage"]


@pytest.mark.parametrize("forge", ["old_mac", "unkeyed_mac"])
def test_an_edited_scan_memo_cannot_hide_a_change(cache, capsys, tmp_path, forge):
    """The memo vouches for a column by its directory's stat: an attacker who renames a tile over
    another and then rewrites the memo with the column's new stat (keeping its old segment
    digests) would hide the change if the memo were trusted; its MAC fails, so it is ignored and
    every column is listed and checked again."""
    built(cache, capsys)
    tiles = _tiles(cache)
    victim = tiles[20]
    (tmp_path / "new.jpg").write_bytes(tiles[0].read_bytes())
    os.replace(tmp_path / "new.jpg", victim)
    memo = cache / SCAN_MEMO
    mac, _, body = memo.read_bytes().partition(b"\n")
    data = json.loads(body)
    st = os.stat(victim.parent)
    prefix = victim.parent.relative_to(cache).as_posix()
    data["columns"][prefix][0] = [st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_size]
    forged = json.dumps(data, separators=(",", ":")).encode()
    mac = mac if forge == "old_mac" else blake3.blake3(forged).hexdigest().encode()
    memo.write_bytes(mac + b"\n" + forged)
    code, out = build(cache, capsys)
    assert code == 0 and executed(out) == [_block(victim), "index:global", "coverage", "manifest"]
