"""What a rebuild redoes, told by which doit tasks ran: blocks, models, preprocessing, index
params, bad tiles."""
from __future__ import annotations

import json
import re
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from conftest import build, built, current, current_files, executed, rewrite

from c10.features.shards import read_shard
from c10.tools import netgen

SECOND = '''
[models.second]
path = "models/second.onnx"
role = "global"
input_size = [64, 64]
'''


def files(root: Path, sub: str) -> dict[str, bytes]:
    """logical path -> bytes of the build's current shard or index files under `sub`."""
    return {rel: path.read_bytes() for rel, path in current_files(root, sub).items()}


def shard_tasks(root: Path, model: str) -> list[str]:
    return sorted(f"shards:{rel.removeprefix('shards/').removesuffix('.npy')}"
                  for rel in current_files(root, f"shards/{model}"))


def with_second_model(cache: Path) -> Path:
    netgen.write_global_model(cache / "models/second.onnx", input_size=64, dim=32, seed=3)
    toml = cache / "c10.toml"
    toml.write_text(toml.read_text() + SECOND)
    return cache


def set_in_second(cache: Path, line: str) -> None:
    toml = cache / "c10.toml"
    toml.write_text(toml.read_text().replace("[models.second]\n", f"[models.second]\n{line}\n"))


def test_removed_block_loses_its_shard_and_nothing_is_left_behind(cache, capsys):
    built(cache, capsys)
    logical, victim = sorted(current_files(cache, "shards/global/15").items())[1]
    bx, by = map(int, Path(logical).stem.split("-"))
    for tile in (cache / "tiles/15").rglob("*.jpg"):
        if int(tile.parent.name) // 4 == bx and int(tile.stem) // 4 == by:
            tile.unlink()
    code, out = build(cache, capsys)
    assert code == 0, out
    assert executed(out) == ["index:global", "coverage", "manifest"]
    # its ref goes at the coverage gate, its file once the new Manifest no longer lists it
    assert f"removed dead .c10/refs/{logical}.json" in out and not victim.exists()
    left = {p.relative_to(cache).as_posix() for p in (cache / "shards").rglob("*")}
    manifest = (cache / "Manifest.json").read_text()
    assert (all(rel in manifest for rel in left if rel.endswith(".npy"))
            and victim.name not in manifest)
    # no temp files or dirs
    assert not [rel for rel in left if not rel.endswith(".npy") and rel.count("/") > 2]
    ids = read_shard(current(cache, "index/global.ids.npy"))
    assert {int(r["x"]) // 4 for r in ids} != set() and \
        not any(int(r["x"]) // 4 == bx and int(r["y"]) // 4 == by for r in ids)
    assert executed(build(cache, capsys)[1]) == ["coverage"]


def test_preprocessing_change_reembeds_every_shard_of_that_model_only(cache, capsys):
    with_second_model(cache)
    built(cache, capsys)
    for line in ("mean = [0.5, 0.5, 0.5]", 'channel_order = "bgr"', 'resize = "nearest"'):
        before = files(cache, "shards/global"), files(cache, "shards/second")
        set_in_second(cache, line)
        code, out = build(cache, capsys)
        assert code == 0, out
        ran = executed(out)
        assert (sorted(t for t in ran if t.startswith("shards:"))
                == shard_tasks(cache, "second")), line
        assert [t for t in ran if not t.startswith("shards:")] == ["index:second", "coverage",
                                                                   "manifest"]
        assert files(cache, "shards/global") == before[0]
        after = files(cache, "shards/second")
        assert after.keys() == before[1].keys() and all(after[k] != before[1][k] for k in after)
        assert {task_values(cache, t)["reused"] for t in shard_tasks(cache, "second")} == {0}


def test_new_preprocessing_code_reembeds_every_shard(cache, capsys, monkeypatch):
    from c10 import config

    built(cache, capsys)
    monkeypatch.setattr(config, "PREPROCESSING_CODE", config.PREPROCESSING_CODE + 1)
    code, out = build(cache, capsys)
    assert code == 0, out
    assert (sorted(t for t in executed(out) if t.startswith("shards:"))
            == shard_tasks(cache, "global"))


def test_new_weights_of_one_model_redo_that_model_only(cache, capsys):
    with_second_model(cache)
    built(cache, capsys)
    netgen.write_global_model(cache / "models/second.onnx", input_size=64, dim=32, seed=9)
    code, out = build(cache, capsys)
    ran = executed(out)
    assert sorted(t for t in ran if t.startswith("shards:")) == shard_tasks(cache, "second")
    assert "engines:second" in ran and "index:second" in ran
    assert not [t for t in ran if t.endswith(":global") or t.startswith("shards:global/")]
    assert code != 0 and "doit prune" in out  # the old engine waits for `doit prune`, as designed


def test_index_params_redo_only_the_index_and_manifest(cache, capsys):
    built(cache, capsys)
    shards = files(cache, "shards")
    toml = cache / "c10.toml"
    for edit in ("ef_search = 99", 'factory = "HNSW16,Flat"', 'metric = "l2"'):
        key = edit.split(" = ")[0]
        toml.write_text(re.sub(rf"^{key} = .*$", edit, toml.read_text(), count=1, flags=re.M))
        code, out = build(cache, capsys)
        assert code == 0, out
        assert executed(out) == ["index:global", "coverage", "manifest"], edit
        assert files(cache, "shards") == shards


@pytest.mark.parametrize("damage", ["truncate", "html"])
def test_a_bad_tile_fails_its_shard_and_keeps_the_previous_cache(cache, capsys, tmp_path, damage):
    built(cache, capsys)
    kept = files(cache, "shards") | files(cache, "index")
    manifest = (cache / "Manifest.json").read_bytes(), (cache / "Manifest.json.dsse").read_bytes()
    tile = sorted((cache / "tiles/15").rglob("*.jpg"))[7]
    data = tile.read_bytes()
    rewrite(tile, {"truncate": data[:len(data) // 3], "html": b"<html>503</html>",
                      "empty": b""}[damage])
    code, out = build(cache, capsys)
    assert code != 0
    rel = tile.relative_to(cache).as_posix()
    assert "DescriptorBatchError" in out and rel in out and "re-download or delete" in out
    assert "doit build_cache" in out and "Traceback" not in out
    assert files(cache, "shards") | files(cache, "index") == kept
    assert ((cache / "Manifest.json").read_bytes(),
            (cache / "Manifest.json.dsse").read_bytes()) == manifest
    tile.unlink()
    code, out = build(cache, capsys)
    assert code == 0, out
    x, y = int(tile.parent.name), int(tile.stem)
    assert executed(out) == [f"shards:global/15/{x // 4}-{y // 4}", "index:global", "coverage",
                             "manifest"]


def test_added_tile_embeds_one_tile_and_reuses_its_block(cache, capsys, tmp_path):
    tile = sorted((cache / "tiles/15").rglob("*.jpg"))[5]
    shutil.move(tile, tmp_path / "held.jpg")
    built(cache, capsys)
    x, y = int(tile.parent.name), int(tile.stem)
    shard = f"shards/global/15/{x // 4}-{y // 4}.npy"
    before = {(int(r["x"]), int(r["y"])): r["desc"].copy()
              for r in read_shard(current(cache, shard))}
    shutil.move(tmp_path / "held.jpg", tile)
    built(cache, capsys)
    after = {(int(r["x"]), int(r["y"])): r["desc"] for r in read_shard(current(cache, shard))}
    assert after.keys() - before.keys() == {(x, y)}
    assert all(np.array_equal(after[k], v) for k, v in before.items())
    values = task_values(cache, f"shards:global/15/{x // 4}-{y // 4}")
    assert (values["embedded"], values["reused"]) == (1, len(before))


def task_values(root: Path, task: str) -> dict:
    """What the task's action returned, as doit saved it in the dep DB."""
    with sqlite3.connect(root / ".c10/doit.sqlite") as db:
        (data,) = db.execute("select task_data from doit where task_id = ?", (task,)).fetchone()
    return json.loads(data)["_values_:"]
