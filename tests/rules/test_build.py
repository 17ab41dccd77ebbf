"""End-to-end builds through the real doit graph: seed CP-TC-1..6 and the incremental rules."""
from __future__ import annotations

import datetime as dt
import os
import re
import shutil

import pytest
from conftest import build, built, executed, rewrite

from c10.cli import main as c10_main
from c10.store.lock import BuildLock


def verify(root, pub, tmp_path) -> int:
    return c10_main(["verify", str(root), "--trusted-keys", str(pub), "--state",
                     str(tmp_path / "state.json")])


def shard_tasks(names):
    return [n for n in names if n.startswith("shards:")]


def test_cold_build_then_verify(cache, capsys, operator_key, tmp_path):  # CP-TC-1
    code, out = build(cache, capsys)
    assert code == 0, out
    ran = executed(out)
    assert ran[0] == "engines:global" and ran[-2:] == ["coverage", "manifest"]
    assert len(shard_tasks(ran)) == len(list((cache / "shards/global/15").iterdir())) > 1
    assert (cache / "Manifest.json").is_file() and (cache / "Manifest.json.dsse").is_file()
    assert verify(cache, operator_key[1], tmp_path) == 0


def test_warm_rerun_runs_only_coverage_and_leaves_manifest(cache, capsys):  # CP-TC-2
    built(cache, capsys)
    before = (cache / "Manifest.json").read_bytes(), os.stat(cache / "Manifest.json").st_mtime_ns
    code, out = build(cache, capsys)
    assert code == 0 and executed(out) == ["coverage"]
    assert ((cache / "Manifest.json").read_bytes(),
            os.stat(cache / "Manifest.json").st_mtime_ns) == before


def _a_tile(cache):
    return sorted((cache / "tiles/15").rglob("*.jpg"))[5]


def _block_task(cache, tile, block=4):
    x, y = int(tile.parent.name), int(tile.stem)
    return f"shards:global/15/{x // block}-{y // block}"


def test_added_tile_redoes_its_block_index_and_manifest(cache, capsys, tmp_path):
    tile = _a_tile(cache)
    saved = tmp_path / "saved.jpg"
    shutil.move(tile, saved)
    built(cache, capsys)
    shutil.move(saved, tile)
    code, out = build(cache, capsys)
    assert code == 0
    assert executed(out) == [_block_task(cache, tile), "index:global", "coverage", "manifest"]


def test_touched_tile_rebuilds_nothing(cache, capsys):
    built(cache, capsys)
    tile = _a_tile(cache)
    os.utime(tile, ns=(1, 1))
    code, out = build(cache, capsys)
    assert code == 0 and executed(out) == ["coverage"]


def test_changed_tile_bytes_redo_its_block(cache, capsys):
    built(cache, capsys)
    tile = _a_tile(cache)
    other = sorted((cache / "tiles/15").rglob("*.jpg"))[0]
    rewrite(tile, other.read_bytes())
    code, out = build(cache, capsys)
    assert executed(out) == [_block_task(cache, tile), "index:global", "coverage", "manifest"]


def test_removed_tile_redoes_its_block(cache, capsys, tmp_path):
    built(cache, capsys)
    tile = _a_tile(cache)
    shutil.move(tile, tmp_path / "gone.jpg")
    code, out = build(cache, capsys)
    assert code == 0
    assert executed(out) == [_block_task(cache, tile), "index:global", "coverage", "manifest"]


def test_different_bbox_rebuilds_and_replaces_manifest(cache, capsys):  # CP-TC-3
    built(cache, capsys)
    first = (cache / "Manifest.json").read_bytes()
    text = (cache / "c10.toml").read_text()
    (cache / "c10.toml").write_text(re.sub(r"bbox = \[.*?\]", "bbox = [50.43, 30.49, 50.47, 30.52]",
                                           text))
    # the tiles outside the new bbox stay in tiles/: inputs out of scope, not orphans
    code, out = build(cache, capsys)
    assert code == 0, out
    assert "index:global" in executed(out) and "manifest" in executed(out)
    assert (cache / "Manifest.json").read_bytes() != first
    assert b'"version":2' in (cache / "Manifest.json").read_bytes()
    live = {p.relative_to(cache).as_posix() for p in (cache / "shards").rglob("*.npy")}
    assert live and all(int(p.split("/")[-1].split("-")[0]) <= 19160 // 4 for p in live)


def test_no_tiles_in_scope_fails_saying_fetch_first(cache, capsys):  # CP-TC-4
    shutil.rmtree(cache / "tiles")
    code, out = build(cache, capsys)
    assert code != 0
    assert "no tiles in scope" in out and "fetch tiles" in out
    assert not (cache / "Manifest.json").exists()


def test_concurrent_build_is_refused_and_state_kept(cache, capsys):  # CP-TC-5
    built(cache, capsys)
    before = (cache / "Manifest.json").read_bytes()
    holder = BuildLock(cache)
    holder.acquire()
    try:
        code, out = build(cache, capsys)
    finally:
        holder.release()
    assert code != 0 and "BuildLockHeldError" in out and f"pid {os.getpid()}" in out
    assert (cache / "Manifest.json").read_bytes() == before


def test_orphan_fails_build_and_keeps_previous_manifest(cache, capsys):  # CP-TC-6
    built(cache, capsys)
    before = (cache / "Manifest.json").read_bytes()
    (cache / "shards" / "notes.txt").write_text("smuggled")
    (cache / "models" / "extra.bin").write_bytes(b"x")
    os.utime(_a_tile(cache), ns=(5, 5))
    code, out = build(cache, capsys)
    assert code != 0 and "ManifestCoverageError" in out
    assert "models/extra.bin" in out
    assert (cache / "Manifest.json").read_bytes() == before


@pytest.mark.parametrize("edit, needle", [
    (lambda t: t.replace("[index]", "[index]\nfactroy = 1"), "index.factroy"),
    (lambda t: re.sub(r"bbox = \[.*?\]", "bbox = [50.5, 30.49, 50.4, 30.56]", t), "area.bbox"),
    (lambda t: t.replace('models/global.onnx', 'models/missing.onnx'), "models/missing.onnx"),
])
def test_bad_request_gives_one_clear_line(cache, capsys, edit, needle):
    (cache / "c10.toml").write_text(edit((cache / "c10.toml").read_text()))
    code, out = build(cache, capsys)
    assert code != 0 and needle in out
    assert "Traceback" not in out


def test_key_inside_cache_is_refused(cache, capsys):
    from c10.trust.keys import generate_key

    generate_key(cache / ".c10" / "inside.pem")
    text = (cache / "c10.toml").read_text()
    (cache / "c10.toml").write_text(re.sub(r'key = ".*?"', f'key = "{cache}/.c10/inside.pem"', text,
                                           count=1))
    code, out = build(cache, capsys)
    assert code != 0 and "SigningKeyError" in out and "inside" in out
    assert not (cache / "engines").exists()


def test_doit_list_and_info(cache, capsys):
    built(cache, capsys)
    code, out = build(cache, capsys, "list")
    assert code == 0
    assert re.search(r"^engines\s+Compile each model", out, re.M)
    assert re.search(r"^build_cache\s+Build the whole takeoff cache", out, re.M)
    code, out = build(cache, capsys, "list", "--all")
    shard = next(line.split()[0] for line in out.splitlines() if line.startswith("shards:"))
    code, out = build(cache, capsys, "info", shard)
    # its tiles are no file_dep (their key comes from the scan): the doc names them
    assert code == 0 and "up-to-date" in out and "tiles of shards/" in out and "tiles/15/" in out


def test_nearly_expired_manifest_is_resigned_by_a_noop_build(cache, capsys, monkeypatch):
    from c10.rules import manifest

    built(cache, capsys)
    later = manifest.now() + dt.timedelta(days=29, hours=12)  # validity_days = 30
    monkeypatch.setattr(manifest, "now", lambda: later)
    code, out = build(cache, capsys)
    assert code == 0 and executed(out) == ["coverage", "manifest"]
    assert b'"version":2' in (cache / "Manifest.json").read_bytes()


def test_parallel_build_in_threads_matches_serial(tmp_path, inputs, operator_key, capsys):
    from conftest import make_cache

    serial, parallel = (make_cache(tmp_path / n, inputs, operator_key)
                        for n in ("serial", "parallel"))
    built(serial, capsys)
    code, out = build(parallel, capsys, "-n", "2", "build_cache")
    assert code == 0, out
    names = [sorted(p.relative_to(root).as_posix()
                    for p in [*root.glob("shards/**/*.npy"), *root.glob("index/*")])
             for root in (serial, parallel)]
    # content names: the same names, the same bytes
    assert names[0] == names[1] and len(names[0]) > 3
    assert all((parallel / rel).read_bytes() == (serial / rel).read_bytes() for rel in names[0])
