"""`c10 status`: what a build would redo and why, from doit's reasons, without the lock or any
write."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from c10.cli import main as c10_main
from c10.rules.driver import build_status, run_build
from c10.store.lock import BuildLock
from c10.tools.status import CALLABLES, plan, render


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


def steps(root: Path) -> dict[str, list[str]]:
    """Task -> why it would run, for the tasks that would."""
    return {s["name"]: s["why"] for s in plan(build_status(root)) if s["run"]}


def built(root: Path, capsys) -> None:
    assert run_build(root) == 0
    capsys.readouterr()


def test_never_built_cache_says_so_and_writes_nothing(cache):
    before = snapshot(cache)
    todo = steps(cache)
    assert todo["engines:global"] == [
        "no successful run recorded (never built, or its last run failed)"]
    assert "index:global" in todo and "manifest" in todo
    assert snapshot(cache) == before and not (cache / ".c10.lock").exists()


def test_up_to_date_cache_exits_zero(cache, capsys):
    built(cache, capsys)
    assert c10_main(["status", str(cache)]) == 0
    out = capsys.readouterr().out
    assert ("up to date: a build changes nothing" in out
            and re.search(r"^  coverage +always runs", out, re.M))
    assert "42 present, 0 missing of 42" in out


def test_added_and_changed_tiles_name_their_blocks_and_what_follows(cache, capsys, tmp_path):
    tiles = sorted((cache / "tiles/15").rglob("*.jpg"))
    shutil.move(tiles[5], tmp_path / "t.jpg")
    built(cache, capsys)
    shutil.move(tmp_path / "t.jpg", tiles[5])
    tiles[20].write_bytes(tiles[0].read_bytes())
    before = snapshot(cache)
    todo = steps(cache)
    for tile in (tiles[5], tiles[20]):  # (changed within 2 s: its column is read again)
        block = f"shards:global/15/{int(tile.parent.name) // 4}-{int(tile.stem) // 4}"
        assert todo[block] == [CALLABLES["tiles_current"]]
    assert todo["index:global"][0].startswith("input rebuilt first by shards:global/15/")
    assert "manifest" in todo
    assert snapshot(cache) == before  # the changed tile was hashed, and the hash cache not saved
    assert c10_main(["status", str(cache)]) == 1


def test_settings_changes_and_the_coverage_gate(cache, capsys):
    built(cache, capsys)
    text = (cache / "c10.toml").read_text()
    (cache / "c10.toml").write_text(text.replace("ef_search = 64", "ef_search = 65"))
    (cache / "models" / "notes.txt").write_text("x")
    (cache / "shards" / "global" / "15" / "999-999.npy").write_bytes(b"dead")
    status = build_status(cache)
    todo = {s["name"]: s["why"] for s in plan(status) if s["run"]}
    assert todo["index:global"] == [
        "index parameters changed (factory, metric, efConstruction, efSearch)"]
    # index params are in the request
    assert todo["manifest"] == ["request, signing key or tile count changed"]
    page = render(status)
    assert "coverage gate would FAIL: 1 undeclared file(s): models/notes.txt" in page
    assert "removes 1 dead file(s): shards/global/15/999-999.npy" in page


def test_a_deleted_shard_file_is_named_as_the_reason(cache, capsys):
    from c10.store.refs import current_path

    built(cache, capsys)
    shard = sorted((cache / ".c10/refs/shards/global/15").iterdir())[0]
    logical = shard.relative_to(cache / ".c10/refs").as_posix().removesuffix(".json")
    current_path(cache, logical).unlink()
    task = "shards:" + logical.removeprefix("shards/").removesuffix(".npy")
    assert steps(cache)[task] == [
        "its file is missing or damaged, or a stopped build left another one current"]


def test_status_works_while_a_build_holds_the_lock(cache, capsys):
    built(cache, capsys)
    holder = BuildLock(cache)
    holder.acquire()
    try:
        assert c10_main(["status", str(cache), "--json"]) == 0
    finally:
        holder.release()
    data = json.loads(capsys.readouterr().out)
    assert (data["tiles_present"] == 42
            and {t["status"] for t in data["tasks"]} <= {"up-to-date", "run"})
    assert os.path.isfile(cache / "Manifest.json")
