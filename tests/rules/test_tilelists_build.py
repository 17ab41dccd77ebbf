"""The build's tile lists (Manifest schema 3): a changed tile rewrites its block's list and the root
only; a kill before the commit leaves the committed root verifying; a flat cache re-signs once."""
from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import blake3
from conftest import build, built, rewrite
from listing import listed_files

from c10.report import BuildOutcome, read_report
from c10.store.layout import LISTS_DIR, MANIFEST_NAME
from c10.trust import manifest as mf
from c10.trust.keys import load_signing_key, load_trusted_keys
from c10.trust.tilelists import LIST_KIND, list_block
from c10.trust.verify import verify_cache


def lists_on_disk(root: Path) -> dict[str, tuple[int, int]]:
    """tile list path -> (inode, mtime): proves which lists a build wrote."""
    return {p.relative_to(root).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in (root / LISTS_DIR).rglob("*") if p.is_file()}


def root_lists(root: Path) -> set[str]:
    body = mf.loads_manifest((root / MANIFEST_NAME).read_bytes())
    return {f["path"] for f in body["files"] if f["kind"] == LIST_KIND}


def verified(root: Path, pub: Path, state: Path | None = None):
    return verify_cache(root, trusted=load_trusted_keys([pub]),
                        now=dt.datetime.now(dt.timezone.utc), state_path=state)


def edit_one_tile(root: Path) -> tuple[str, bytes]:
    """(path, its bytes before) of the tile given another tile's bytes, renamed over it as a copy
    tool does (an in-place rewrite is seen only by the full-stat mode)."""
    tiles = sorted((root / "tiles/15").rglob("*.jpg"))
    old = tiles[5].read_bytes()
    rewrite(tiles[5], tiles[0].read_bytes())
    return tiles[5].relative_to(root).as_posix(), old


def block_of_tile(rel: str, block: int = 4) -> tuple[int, int, int]:
    _, z, x, name = rel.split("/")
    return int(z), int(x) // block, int(name.split(".")[0]) // block


def test_a_changed_tile_rewrites_its_blocks_list_and_the_root_only(built_cache, capsys, pub,
                                                                   tmp_path):
    state = tmp_path / "state.json"
    verified(built_cache, pub, state)
    before = lists_on_disk(built_cache)
    assert set(before) == root_lists(built_cache)
    rel, _ = edit_one_tile(built_cache)
    built(built_cache, capsys)
    after = lists_on_disk(built_cache)
    assert set(after) == root_lists(built_cache)  # the old list of that block is gone
    new = set(after) - set(before)
    assert [list_block(p) for p in new] == [block_of_tile(rel)]
    kept = set(after) & set(before)
    assert len(kept) == len(before) - 1 and all(after[p] == before[p] for p in kept)  # untouched
    assert verified(built_cache, pub, state).version == 2  # anti-rollback state moves on
    listed = {f["path"]: f for f in listed_files(built_cache)}
    assert listed[rel]["blake3"] == blake3.blake3((built_cache / rel).read_bytes()).hexdigest()
    # nothing changed: nothing written, IDEMPOTENT_NO_OP
    manifest = (built_cache / MANIFEST_NAME).read_bytes()
    built(built_cache, capsys)
    assert lists_on_disk(built_cache) == after
    assert (built_cache / MANIFEST_NAME).read_bytes() == manifest


def test_a_kill_before_the_commit_leaves_the_committed_root_verifying(built_cache, capsys, pub,
                                                                     monkeypatch):
    committed = (built_cache / MANIFEST_NAME).read_bytes()
    rel, old = edit_one_tile(built_cache)

    def killed(*args, **kw):
        raise RuntimeError("killed before the envelope's rename")

    monkeypatch.setattr(mf, "write_signed_manifest", killed)
    code, out = build(built_cache, capsys)
    assert code != 0
    assert (built_cache / MANIFEST_NAME).read_bytes() == committed
    pending = set(lists_on_disk(built_cache)) - root_lists(built_cache)
    assert len(pending) == 1  # the new list, written before the root that would name it
    (built_cache / rel).write_bytes(old)  # the tile as the committed root signs it
    result = verified(built_cache, pub)  # the old root, its lists all there; the new one pending
    assert result.version == 1 and result.pending >= 1
    monkeypatch.undo()
    edit_one_tile(built_cache)
    built(built_cache, capsys)
    assert set(lists_on_disk(built_cache)) == root_lists(built_cache)
    assert verified(built_cache, pub).version == 2


def test_a_list_write_that_fails_signs_nothing(built_cache, capsys, pub, monkeypatch):
    from c10.store import atomic

    committed = (built_cache / MANIFEST_NAME).read_bytes()
    rel, old = edit_one_tile(built_cache)
    real = atomic.replace_unsynced

    def full_disk(target, data, *args, **kw):
        if Path(target).parent.parent.name == LISTS_DIR:
            raise atomic.storage_error(Path(target), OSError(28, os.strerror(28)))
        return real(target, data, *args, **kw)

    monkeypatch.setattr(atomic, "replace_unsynced", full_disk)
    code, out = build(built_cache, capsys)
    assert code != 0 and "No space left" in out
    assert (built_cache / MANIFEST_NAME).read_bytes() == committed
    (built_cache / rel).write_bytes(old)
    assert verified(built_cache, pub).version == 1


def test_a_flat_cache_is_re_signed_as_a_tree_once(built_cache, capsys, pub, operator_key):
    body = mf.loads_manifest((built_cache / MANIFEST_NAME).read_bytes())
    files = listed_files(built_cache)
    flat = dict(body, schema_version=2, version=2,
                files=[f for f in files if f["kind"] != LIST_KIND])
    key = load_signing_key(operator_key[0], passphrase=None, cache_root=None)
    mf.write_signed_manifest(built_cache, mf.dumps_manifest(flat), key)
    for rel in root_lists(built_cache) | set(lists_on_disk(built_cache)):
        (built_cache / rel).unlink(missing_ok=True)
    assert verified(built_cache, pub).files == len(flat["files"])  # schema 2 still verifies
    built(built_cache, capsys)  # nothing changed: it stays flat, and valid
    assert mf.loads_manifest((built_cache / MANIFEST_NAME).read_bytes())["schema_version"] == 2
    rel, _ = edit_one_tile(built_cache)  # the next change signs a tree
    out = built(built_cache, capsys)
    assert read_report(built_cache).outcome is BuildOutcome.SUCCESS, out
    tree = mf.loads_manifest((built_cache / MANIFEST_NAME).read_bytes())
    assert (tree["schema_version"], tree["version"]) == (3, 3)
    assert {f["path"] for f in listed_files(built_cache) if f["kind"] == "tile"} == {
        f["path"] for f in files if f["kind"] == "tile"}
    assert verified(built_cache, pub).version == 3


def test_the_coverage_gate_removes_a_stale_list(built_cache, capsys):
    stale = f"{LISTS_DIR}/15/0-0.{'ab' * 8}.json"  # what a stopped build of another tile set left
    (built_cache / stale).parent.mkdir(parents=True, exist_ok=True)
    (built_cache / stale).write_bytes(b"{}")
    edit_one_tile(built_cache)
    out = built(built_cache, capsys)
    assert f"removed dead {stale}" in out and not (built_cache / stale).exists()
