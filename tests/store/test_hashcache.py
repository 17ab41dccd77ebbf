"""The tiles' hash cache, one file per column: a build loads and rewrites what it hashed."""
from __future__ import annotations

import json
import os

from c10.store.digest import blake3_file
from c10.store.hashcache import HashCache, stat_key
from c10.store.layout import (
    HASH_CACHES,
    is_control_dir_dir,
    is_control_dir_file,
    tile_hashes_relpath,
)


def tile(root, x, y, data: bytes) -> str:
    rel = f"tiles/17/{x}/{y}.jpg"
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(data)
    return rel


def test_each_column_has_its_own_file_and_an_untouched_column_is_not_rewritten(tmp_path):
    a, b = tile(tmp_path, 1, 1, b"a"), tile(tmp_path, 2, 1, b"b")
    hashes = HashCache(tmp_path)
    hashes.hash(a), hashes.hash(b)
    hashes.save()
    col_a, col_b = (tmp_path / tile_hashes_relpath("17", x) for x in ("1", "2"))
    assert set(json.loads(col_a.read_bytes())) == {a} and set(json.loads(col_b.read_bytes())) == {b}
    col_b.write_bytes(b"{not json")  # were it loaded, column 2 would be re-hashed and rewritten
    torn = col_b.stat().st_mtime_ns
    c = tile(tmp_path, 1, 2, b"c")
    again = HashCache(tmp_path)
    assert again.hash(c)[0] == blake3_file(tmp_path / c)
    again.save()
    assert set(json.loads(col_a.read_bytes())) == {a, c}
    assert col_b.stat().st_mtime_ns == torn and col_b.read_bytes() == b"{not json"


def test_a_torn_column_file_is_not_trusted_and_is_rehashed(tmp_path):
    a = tile(tmp_path, 1, 1, b"a")
    column = tmp_path / tile_hashes_relpath("17", "1")
    column.parent.mkdir(parents=True)
    forged = json.dumps({a: [*stat_key(os.stat(tmp_path / a)), "00" * 32]})
    column.write_text(forged[:-1])  # a kill in the middle of the write
    assert HashCache(tmp_path).hash(a)[0] == blake3_file(tmp_path / a)


def test_an_older_single_file_cache_is_split_into_columns_without_rehashing(tmp_path):
    a, b = tile(tmp_path, 1, 1, b"a"), tile(tmp_path, 2, 1, b"b")
    legacy = tmp_path / HASH_CACHES["tiles"]
    legacy.parent.mkdir(parents=True)
    # marker digests: a re-hash would give the real blake3, the migration keeps these
    legacy.write_text(json.dumps({a: [*stat_key(os.stat(tmp_path / a)), "aa" * 32],
                                  b: [*stat_key(os.stat(tmp_path / b)), "bb" * 32]}))
    hashes = HashCache(tmp_path)
    assert hashes.hash(a)[0] == "aa" * 32
    hashes.save()
    assert not legacy.exists()
    assert HashCache(tmp_path).hash(b)[0] == "bb" * 32  # its column file, written by the save


def test_the_ground_verifier_accepts_the_column_files_and_nothing_else_there():
    assert is_control_dir_file("tilehashes/17/42.json")
    assert is_control_dir_dir("tilehashes") and is_control_dir_dir("tilehashes/17")
    for rel in ("tilehashes/17/42.json.bak", "tilehashes/17/42/1.json", "tilehashes/x.json",
                "tilehashes/17/../42.json"):
        assert not is_control_dir_file(rel), rel
    assert not is_control_dir_dir("tilehashes/17/42")


def test_threads_hashing_one_column_keep_every_entry(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    rels = [tile(tmp_path, 1, y, bytes([y])) for y in range(64)]
    hashes = HashCache(tmp_path)  # `doit -n N`: shard threads share the build's cache
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(hashes.hash, rels))
    hashes.save()
    assert set(json.loads((tmp_path / tile_hashes_relpath("17", "1")).read_bytes())) == set(rels)


def test_size_hash_stats_a_tile_once_per_build(tmp_path, monkeypatch):
    """The shard task's (size, blake3) is the one the graph load's stat found: no second stat;
    a tile this build never hashed is stat'ed and hashed, and the next build sees a rewrite."""
    a = tile(tmp_path, 1, 1, b"first")
    hashes = HashCache(tmp_path)
    first = hashes.hash(a)[0]
    (tmp_path / a).write_bytes(b"rewritten")
    b = tile(tmp_path, 1, 2, b"other")
    stats = []
    real = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *args, **kw: stats.append(p) or real(p, *args, **kw))
    assert hashes.size_hash(a) == (5, first) and not stats
    assert hashes.size_hash(b) == (5, blake3_file(tmp_path / b)) and len(stats) == 1
    assert HashCache(tmp_path).size_hash(a) == (9, blake3_file(tmp_path / a))


def test_retain_drops_only_what_each_loaded_bucket_no_longer_holds(tmp_path):
    a, b, c = (tile(tmp_path, x, y, bytes([x, y])) for x, y in ((1, 1), (1, 2), (2, 1)))
    hashes = HashCache(tmp_path)
    for rel in (a, b, c):
        hashes.hash(rel)
    hashes.save()
    later = HashCache(tmp_path)
    later.hash(a)  # column 17/1 loaded; 17/2 is not
    later.remember(a, os.stat(tmp_path / a), "0" * 64)  # something added since the load
    asked: list[str] = []

    def keep(bucket: str) -> set[str]:
        asked.append(bucket)
        return {a}  # b's file went

    later.retain(keep)
    later.save()
    assert asked == ["17/1"]
    assert set(json.loads((tmp_path / tile_hashes_relpath("17", "1")).read_bytes())) == {a}
    assert set(json.loads((tmp_path / tile_hashes_relpath("17", "2")).read_bytes())) == {c}


def test_a_build_forgets_the_hash_of_a_removed_tile(built_cache, capsys):
    from conftest import built

    column = sorted((built_cache / "tiles/15").iterdir())[0]
    gone, kept = sorted(column.iterdir())[:2]
    z, x = column.parent.name, column.name
    memo = built_cache / tile_hashes_relpath(z, x)
    rel = lambda p: p.relative_to(built_cache).as_posix()  # noqa: E731
    assert {rel(gone), rel(kept)} <= set(json.loads(memo.read_bytes()))
    gone.unlink()
    built(built_cache, capsys)
    held = set(json.loads(memo.read_bytes()))
    assert rel(kept) in held and rel(gone) not in held


def test_hash_tiles_is_hash_of_each_and_none_for_a_file_gone(tmp_path):
    rels = [tile(tmp_path, 3, y, bytes([y]) * 9) for y in range(4)]
    hashes = HashCache(tmp_path)
    first = hashes.hash_tiles(rels)
    assert first == [blake3_file(tmp_path / rel) for rel in rels]
    hashes.save()
    (tmp_path / rels[1]).unlink()
    os.replace(tmp_path / rels[3], tmp_path / rels[2])  # renamed over: a new inode, new bytes
    later = HashCache(tmp_path)
    assert later.hash_tiles(rels) == [first[0], None, first[3], None]
    assert later.hash_tiles([]) == []
