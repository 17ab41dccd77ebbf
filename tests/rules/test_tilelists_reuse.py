"""An incremental Manifest reuses the signed lists of unchanged blocks, never trusting its memo."""
from __future__ import annotations

import json

import pytest
from conftest import built, rewrite
from test_tilelists_build import block_of_tile, root_lists, verified

from c10.features import shards as shard_rows
from c10.store.layout import LISTS_MEMO
from c10.trust.tilelists import list_block


@pytest.fixture
def parsed(monkeypatch) -> list[int]:
    """Counts the shards whose tile rows the manifest task reads (the real reader runs)."""
    calls: list[int] = []
    real = shard_rows.tile_facts

    def counted(source):
        calls.append(1)
        return real(source)

    monkeypatch.setattr(shard_rows, "tile_facts", counted)
    return calls


def edit_one_tile(root, k: int = 5) -> str:
    """The path of tile k, given tile 0's bytes by a rename over it (as a copy tool writes)."""
    tiles = sorted((root / "tiles/15").rglob("*.jpg"))
    rewrite(tiles[k], tiles[0].read_bytes())
    return tiles[k].relative_to(root).as_posix()


def memo(root) -> dict[str, list[str]]:
    return json.loads((root / LISTS_MEMO).read_bytes())["blocks"]


def test_only_the_changed_blocks_shards_are_read(built_cache, capsys, pub, parsed):
    assert {p for _, p in memo(built_cache).values()} == root_lists(built_cache)
    every = len(memo(built_cache))
    edit_one_tile(built_cache)
    built(built_cache, capsys)
    one_block = len(parsed)
    assert 0 < one_block < every  # the other blocks' lists came from the last Manifest
    assert {p for _, p in memo(built_cache).values()} == root_lists(built_cache)
    verified(built_cache, pub)
    # without the memo every block's list is rebuilt from its shards: same root, all read
    (built_cache / LISTS_MEMO).unlink()
    edit_one_tile(built_cache, 9)
    parsed.clear()
    built(built_cache, capsys)
    assert len(parsed) >= every
    verified(built_cache, pub)


def test_a_tampered_unchanged_list_is_rewritten_not_reused(built_cache, capsys, pub):
    victim = built_cache / sorted(root_lists(built_cache))[-1]
    signed = victim.read_bytes()
    victim.write_bytes(signed.replace(b'"tiles"', b'"tilez"'))  # same size, other bytes
    rel = edit_one_tile(built_cache)
    assert list_block(victim.relative_to(built_cache).as_posix()) != block_of_tile(rel)
    built(built_cache, capsys)
    assert victim.read_bytes() == signed
    verified(built_cache, pub)


def test_a_forged_memo_costs_rebuilds_never_a_wrong_list(built_cache, capsys, pub, parsed):
    """The attacker of .c10/ swaps two blocks' lists in the memo (keys kept): each block still
    gets its own list, and the cache verifies."""
    blocks = memo(built_cache)
    (a, va), (b, vb) = sorted(blocks.items())[:2]
    blocks[a], blocks[b] = [va[0], vb[1]], [vb[0], va[1]]
    (built_cache / LISTS_MEMO).write_text(json.dumps({"blocks": blocks}))
    edit_one_tile(built_cache)
    built(built_cache, capsys)
    assert {tuple(map(int, name.split("/"))): list_block(p)
            for name, (_, p) in memo(built_cache).items()} == {
        list_block(p): list_block(p) for p in root_lists(built_cache)}
    verified(built_cache, pub)
    (built_cache / LISTS_MEMO).write_bytes(b"{not json")  # malformed: every list rebuilt
    edit_one_tile(built_cache, 9)
    built(built_cache, capsys)
    verified(built_cache, pub)


@pytest.mark.parametrize("forged", ["empty", "everything"])
def test_forged_list_keys_cost_a_computation_never_a_row(built_cache, capsys, pub, forged):
    """LIST_KEYS is unsigned: keys that hide every signed tile make a copied tile be embedded
    again; keys that claim tiles no list holds make the committed shards be scanned for them.
    Either way the rows are the engine's and the cache verifies."""
    import numpy as np

    from c10.features.shards import read_shard
    from c10.report import read_report
    from c10.store.listkeys import read_list_keys, write_list_keys

    honest = read_list_keys(built_cache)
    fill = (lambda k: np.zeros(0, "<u8")) if forged == "empty" else (
        lambda k: np.concatenate([k, np.arange(1, 1 + 4 * len(k), dtype="<u8")]))
    write_list_keys(built_cache, {d: fill(k) for d, k in honest.items()})
    tiles = sorted((built_cache / "tiles/15").rglob("*.jpg"))
    far = next(t for t in tiles[::-1] if block_of_tile(t.relative_to(built_cache).as_posix())
               != block_of_tile(tiles[0].relative_to(built_cache).as_posix()))
    rewrite(far, tiles[0].read_bytes())  # another block's bytes: found only through the hint
    built(built_cache, capsys)
    report = read_report(built_cache)
    assert report.descriptors_generated == (1 if forged == "empty" else 0)
    verified(built_cache, pub)
    rows = {}
    for path in (built_cache / "shards").rglob("*.npy"):
        for row in read_shard(path):
            rows.setdefault(row["blake3"].tobytes(), []).append(row["desc"])
    assert rows
    for same in rows.values():  # a tile's bytes give one descriptor, wherever it was embedded
        assert all(np.allclose(same[0], other, atol=1e-6) for other in same)
