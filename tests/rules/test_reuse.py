"""Descriptors reused by content across the whole trusted cache (c10.features.descriptor_store): a
reverted request, a re-widened area, a block size change and a tile copied under another id embed
nothing again; trust is not widened (a copied cache has no ledger; a forged shard is never a
source); and the shards are the very bytes a cold build writes."""
from __future__ import annotations

import datetime as dt
import io
import json
import re
import shutil
from pathlib import Path

import blake3
import numpy as np
from conftest import BBOX, build, built, current_files, make_cache, plan_of

from c10.features.shards import read_shard
from c10.rules.driver import run_build
from c10.store.layout import tagged_relpath
from c10.trust.keys import load_trusted_keys
from c10.trust.verify import verify_cache


def reuse_cache(root: Path, inputs, key, block: int = 4) -> Path:
    """A test cache that may miss tiles (the tests take some away)."""
    make_cache(root, inputs, key, block=block)
    set_area(root, "require_complete", "false")
    return root


def set_area(root: Path, name: str, value: str) -> None:
    toml = root / "c10.toml"
    text = re.sub(rf"(?m)^{name} = .*\n", "", toml.read_text())
    toml.write_text(text.replace("[area]\n", f"[area]\n{name} = {value}\n", 1))


def set_block(root: Path, block: int) -> None:
    toml = root / "c10.toml"
    toml.write_text(re.sub(r"(?m)^block = \d+$", f"block = {block}", toml.read_text()))


def counts(root: Path) -> tuple[int, int]:
    """(descriptors embedded, reused) of the last build."""
    report = json.loads((root / ".c10/report.json").read_bytes())
    assert report["outcome"] == "success", report
    return report["descriptors_generated"], report["descriptors_reused"]


def outputs(root: Path) -> dict[str, bytes]:
    """logical path -> bytes of the build's current shard and index files."""
    return {rel: path.read_bytes()
            for top in ("shards", "index") for rel, path in current_files(root, top).items()}


def tiles(root: Path) -> list[Path]:
    return sorted((root / "tiles/15").rglob("*.jpg"))


def in_block(tile: Path, block: tuple[int, int], size: int = 4) -> bool:
    return (int(tile.parent.name) // size, int(tile.stem) // size) == block


def hold(root: Path, paths, away: Path) -> list[tuple[Path, Path]]:
    """Move tiles out of the cache; (where it was, where it is) for put_back."""
    moved = []
    for path in paths:
        to = away / path.relative_to(root)
        to.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(path, to)
        moved.append((path, to))
    return moved


def put_back(moved, root: Path | None = None, at: Path | None = None) -> None:
    """Restore held tiles (into the cache at `root` instead when given: a copy of `at`)."""
    for path, held in moved:
        dest = root / path.relative_to(at) if root is not None else path
        shutil.copy2(held, dest) if root is not None else shutil.move(held, dest)


def cold_build(tmp_path: Path, like: Path, inputs, key) -> Path:
    """A fresh cache at another path (no ledger, no Manifest) with `like`'s tiles and request."""
    root = make_cache(tmp_path / "cold", inputs, key)
    shutil.rmtree(root / "tiles")
    shutil.copytree(like / "tiles", root / "tiles")
    (root / "c10.toml").write_text((like / "c10.toml").read_text())
    return root


def assert_same_as_cold(root: Path, tmp_path: Path, inputs, key, capsys) -> None:
    cold = cold_build(tmp_path, root, inputs, key)
    built(cold, capsys)
    assert counts(cold)[0] == len({t.read_bytes() for t in tiles(cold)})  # each content once
    assert outputs(root) == outputs(cold)


def test_tiles_taken_away_and_restored_embed_nothing(tmp_path, inputs, operator_key, capsys):
    root = reuse_cache(tmp_path / "cache", inputs, operator_key)
    set_area(root, "require_complete", "true")
    built(root, capsys)
    first, manifest = outputs(root), (root / "Manifest.json").read_bytes()
    blocks = sorted({(int(t.parent.name) // 4, int(t.stem) // 4) for t in tiles(root)})
    gone = [t for t in tiles(root) if in_block(t, blocks[0])]          # a whole block
    gone += [t for t in tiles(root) if in_block(t, blocks[1])][:2]     # and part of another
    moved = hold(root, gone, tmp_path / "held")
    code, out = build(root, capsys)  # the shards are rebuilt, the gate refuses an incomplete area
    assert code != 0 and "MissingTilesError" in out
    assert (root / "Manifest.json").read_bytes() == manifest
    put_back(moved)
    built(root, capsys)
    rebuilt = [t for t in tiles(root) if in_block(t, blocks[0]) or in_block(t, blocks[1])]
    assert counts(root) == (0, len(rebuilt))
    assert outputs(root) == first  # the bytes of the cold first build


def test_a_rewidened_area_reuses_what_a_trusted_shard_still_holds(tmp_path, inputs, operator_key,
                                                                  capsys):
    root = reuse_cache(tmp_path / "cache", inputs, operator_key)
    built(root, capsys)
    wide = outputs(root)
    south, west, north, _ = BBOX

    def narrow() -> list:
        set_area(root, "bbox", str([south, west, north, 30.525]))
        plan = plan_of(root)
        moved = hold(root, [root / t.path for t in plan.out_of_scope], tmp_path / "held")
        assert 0 < len(moved) < len(plan.tiles)
        return moved

    # narrowed, built up to the index, not committed: the Manifest still lists the wide shards
    moved = narrow()
    assert run_build(root, ["shards", "index"]) == 0
    set_area(root, "bbox", str(list(BBOX)))
    put_back(moved)
    built(root, capsys)
    assert counts(root)[0] == 0
    assert outputs(root) == wide
    # narrowed and committed: the commit removes the shards of the blocks it dropped (no Manifest
    # and no ledger can vouch for a file that is gone); a copy of the cache at another path has
    # this host's Manifest but not its ledger
    moved = narrow()
    built(root, capsys)
    assert counts(root)[0] == 0
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, symlinks=True)
    for cache in (root, copy):
        set_area(cache, "bbox", str(list(BBOX)))
    put_back(moved, copy, root)
    put_back(moved)
    for cache in (root, copy):
        built(cache, capsys)
        assert counts(cache)[0] == len(moved)  # the rest of their blocks is reused
        assert outputs(cache) == wide


def test_a_stopped_builds_shards_are_reused_on_this_host_only(tmp_path, inputs, operator_key,
                                                             capsys):
    """Shards no Manifest lists yet are trusted through this host's ledger for this cache path: a
    copy of the cache elsewhere embeds everything again."""
    root = reuse_cache(tmp_path / "cache", inputs, operator_key)
    assert run_build(root, ["shards"]) == 0
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, symlinks=True)
    shutil.rmtree(copy / "engines")  # no signature or ledger vouches for it there: compiled again
    for cache in (root, copy):
        set_block(cache, 8)
        built(cache, capsys)
    assert counts(root) == (0, len(tiles(root)))
    assert counts(copy) == (len(tiles(copy)), 0)
    assert outputs(root) == outputs(copy)


def test_a_block_size_change_embeds_nothing_and_matches_a_cold_build(tmp_path, inputs,
                                                                    operator_key, capsys):
    root = reuse_cache(tmp_path / "cache", inputs, operator_key)
    built(root, capsys)
    four = outputs(root)
    set_block(root, 8)
    code, out = build(root, capsys, "-n", "2", "-P", "thread", "build_cache")
    assert code == 0, out
    assert counts(root) == (0, len(tiles(root)))
    assert len(current_files(root, "shards")) < len([r for r in four if r.startswith("shards/")])
    assert_same_as_cold(root, tmp_path, inputs, operator_key, capsys)
    set_block(root, 4)
    built(root, capsys)
    assert counts(root) == (0, len(tiles(root))) and outputs(root) == four


def test_a_tile_copied_under_another_id_is_embedded_once(tmp_path, inputs, operator_key, capsys):
    root = reuse_cache(tmp_path / "cache", inputs, operator_key)
    paths = tiles(root)
    original = paths[0]
    block = (int(original.parent.name) // 4, int(original.stem) // 4)
    same = next(t for t in paths[1:] if in_block(t, block))
    other = next(t for t in paths if not in_block(t, block))
    for twin in (same, other):
        twin.write_bytes(original.read_bytes())
    built(root, capsys)
    assert counts(root) == (len(paths) - 2, 2)
    desc = {(int(r["x"]), int(r["y"])): r["desc"]
            for path in current_files(root, "shards").values() for r in read_shard(path)}
    ids = [(int(t.parent.name), int(t.stem)) for t in (original, same, other)]
    assert all(np.array_equal(desc[ids[0]], desc[i]) for i in ids[1:])
    assert_same_as_cold(root, tmp_path, inputs, operator_key, capsys)
    # later, a tile replaced by the bytes of a tile embedded before: nothing to embed
    third = next(t for t in reversed(paths) if not in_block(t, block) and t != other)
    third.write_bytes(paths[5].read_bytes())
    built(root, capsys)
    assert counts(root)[0] == 0


def test_a_forged_shard_is_never_a_source(tmp_path, inputs, operator_key, capsys):
    """A shard of this host's ledger forged in place, and a forged shard under its own content
    name (listed nowhere): neither gives a row; their tiles are embedded again."""
    root = reuse_cache(tmp_path / "cache", inputs, operator_key)
    assert run_build(root, ["shards"]) == 0  # stopped before its commit: trusted via the ledger
    capsys.readouterr()
    logical, shard = sorted(current_files(root, "shards/global").items())[2]
    rows = read_shard(shard)
    rows["desc"] = rows["desc"][::-1].copy()  # each tile gets another tile's descriptor
    buf = io.BytesIO()
    np.save(buf, rows, allow_pickle=False)
    forged = buf.getvalue()
    shard.write_bytes(forged)  # in place: bytes the ledger does not hold
    planted = root / tagged_relpath(logical, blake3.blake3(forged).hexdigest())
    planted.write_bytes(forged)  # under its own content name: in no Manifest or ledger
    set_block(root, 8)  # every row is looked up by content, in every trusted shard
    out = built(root, capsys)
    assert counts(root) == (len(rows), len(tiles(root)) - len(rows))
    assert not planted.exists() and f"removed dead {planted.relative_to(root)}" in out
    verify_cache(root, trusted=load_trusted_keys([operator_key[1]]),
                 now=dt.datetime.now(dt.timezone.utc), state_path=None)
    assert_same_as_cold(root, tmp_path, inputs, operator_key, capsys)
