"""The descriptor store on its own: rows found by tile bytes + identity in any source, the same
block's versions without an index, only from bytes the reader vouches for, rows a build adds,
threads."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from c10.features import descriptor_store
from c10.features.descriptor_store import DescriptorStore, Source, _key_columns
from c10.features.shards import DESCRIPTORS, LOCAL_FEATURES, TileRecord, pack_shard
from c10.store.tiles import Tile

IDENT, OTHER = "ab" * 32, "cd" * 32
COLS = DESCRIPTORS.columns


def digest(i: int) -> str:
    return f"{i:08x}" + "5a" * 28


def record(x: int, y: int, i: int) -> TileRecord:
    return TileRecord(Tile(15, x, y, f"tiles/15/{x}/{y}.jpg"), 100 + i, digest(i))


def desc(i: int) -> np.ndarray:
    return np.full(4, i, np.float32)


class Shard:
    """A shard file on disk and what its trusted reader returns (set `trusted` False: the bytes
    were changed since they were trusted)."""

    def __init__(self, path: Path, records, ident: str = IDENT, logical: str | None = None,
                 values=None):
        self.path, self.trusted, self.reads = path, True, 0
        self.data = pack_shard(records, [np.stack(values if values is not None else
                                                  [desc(int(r.blake3[:8], 16)) for r in records])],
                               ident)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.data)
        self.source = Source(path, self.read, logical)

    def read(self) -> bytes | None:
        self.reads += 1
        return self.data if self.trusted else None


def keys(*pairs) -> list:
    return [((15, x, y), digest(i)) for x, y, i in pairs]


def values(rows) -> list:
    return [None if r is None else int(r[0][0]) for r in rows]


def test_a_row_is_found_by_tile_bytes_and_identity_whatever_its_id(tmp_path):
    a = Shard(tmp_path / "a.npy", [record(0, 0, 1), record(0, 1, 2)], logical="15/0-0")
    b = Shard(tmp_path / "b.npy", [record(4, 0, 3)], logical="15/1-0")
    c = Shard(tmp_path / "c.npy", [record(8, 0, 4)], OTHER, logical="15/2-0")
    store = DescriptorStore([a.source, b.source, c.source])
    # tile 3 copied to (9, 9), tile 1 moved to another block, tile 4 only under another identity
    found = store.reuser(IDENT, COLS, "15/2-2")(keys((9, 9, 3), (5, 5, 1), (8, 0, 4), (1, 1, 7)))
    assert values(found) == [3, 1, None, None]
    assert (store.scanned, a.reads, b.reads, c.reads) == (3, 1, 1, 0)
    assert values(store.reuser(OTHER, COLS)(keys((8, 0, 4)))) == [4]
    # a source without the codec's columns gives nothing (local features vs descriptors)
    assert values(store.reuser(IDENT, LOCAL_FEATURES.columns)(keys((9, 9, 3)))) == [None]


def test_the_versions_of_the_same_block_need_no_index(tmp_path):
    old = Shard(tmp_path / "old.npy", [record(0, 0, 1), record(0, 1, 2)], logical="15/0-0")
    other = Shard(tmp_path / "other.npy", [record(4, 0, 3)], logical="15/1-0")
    store = DescriptorStore([old.source, other.source])
    assert values(store.reuser(IDENT, COLS, "15/0-0")(keys((0, 1, 2), (0, 0, 1)))) == [2, 1]
    assert (store.scanned, old.reads, other.reads) == (0, 1, 0)  # one block changed: one read


def test_listed_shards_are_scanned_only_for_a_tile_the_listing_has(tmp_path):
    """A signed Manifest lists the tiles its shards hold: a tile with new bytes costs no scan of
    the committed shards, a moved one does (once)."""
    signed = [Shard(tmp_path / f"s{i}.npy", [record(i, 0, i)], logical=f"15/{i}") for i in range(3)]
    for shard in signed:
        shard.source = Source(shard.path, shard.read, shard.source.logical, listed=True)
    pending = Shard(tmp_path / "p.npy", [record(9, 0, 9)], logical="15/9")  # a stopped build's
    asked = []

    def listing():
        asked.append(1)
        keys = b"".join(bytes.fromhex(digest(i))[:8] for i in range(3))
        return np.sort(np.frombuffer(keys, "<u8"))

    store = DescriptorStore([*(s.source for s in signed), pending.source], listing)
    new_tile = store.reuser(IDENT, COLS, "15/0")(keys((0, 0, 0), (0, 1, 50)))
    assert values(new_tile) == [0, None] and store.scanned == 1  # the unlisted source only
    assert values(store.reuser(IDENT, COLS, "15/7")(keys((7, 7, 9)))) == [9]
    assert values(store.reuser(IDENT, COLS, "15/7")(keys((7, 7, 2), (7, 8, 1)))) == [2, 1]
    assert store.scanned == 4 and asked == [1]
    assert [s.reads for s in signed] == [1, 1, 1]


def test_only_bytes_the_reader_vouches_for_give_rows(tmp_path):
    genuine = Shard(tmp_path / "g.npy", [record(0, 0, 1), record(0, 1, 2)], logical="15/0-0")
    store = DescriptorStore([genuine.source])
    assert values(store.reuser(IDENT, COLS, "15/1-1")(keys((0, 0, 1)))) == [1]  # indexed
    genuine.trusted = False  # the file changed after it was indexed
    assert values(store.reuser(IDENT, COLS, "15/1-1")(keys((0, 0, 1), (0, 1, 2)))) == [None] * 2
    # a file whose key columns claim a tile its trusted bytes do not hold: the row is checked (the
    # index is a hint: it may cost a computation, never give a wrong row)
    truth = Shard(tmp_path / "t.npy", [record(0, 0, 5)])
    claim = Shard(tmp_path / "t.npy", [record(0, 0, 6)])  # on disk now, not what read() returns
    assert claim.path.read_bytes() == claim.data
    store = DescriptorStore([Source(truth.path, truth.read)])
    assert values(store.reuser(IDENT, COLS)(keys((0, 0, 6)))) == [None] and truth.reads == 1


def test_a_blake3_prefix_collision_is_told_apart(tmp_path):
    twin = TileRecord(Tile(15, 0, 1, "tiles/15/0/1.jpg"), 1, digest(1)[:16] + "77" * 24)
    shard = Shard(tmp_path / "s.npy", [record(0, 0, 1), twin], values=[desc(1), desc(9)])
    store = DescriptorStore([shard.source])
    found = store.reuser(IDENT, COLS)([((15, 3, 3), twin.blake3), ((15, 4, 4), digest(1))])
    assert values(found) == [9, 1]


def test_rows_a_build_writes_are_found_by_later_shards(tmp_path):
    store = DescriptorStore(lambda: [])
    written = Shard(tmp_path / "w.npy", [record(0, 0, 1)])
    assert values(store.reuser(IDENT, COLS, "15/1-0")(keys((4, 0, 1)))) == [None]
    store.add(written.source, [digest(1)], IDENT)
    assert values(store.reuser(IDENT, COLS, "15/1-0")(keys((4, 0, 1)))) == [1]
    assert values(store.reuser(OTHER, COLS, "15/1-0")(keys((4, 0, 1)))) == [None]


def test_key_columns_are_read_a_few_rows_at_a_time(tmp_path, monkeypatch):
    shard = Shard(tmp_path / "s.npy", [record(0, y, y) for y in range(7)])
    want = [[int.from_bytes(bytes.fromhex(digest(i))[:8], "little") for i in range(7)],
            [int.from_bytes(bytes.fromhex(IDENT)[:8], "little")] * 7]
    assert [k.tolist() for k in _key_columns(shard.path)] == want
    monkeypatch.setattr(descriptor_store, "_CHUNK", 200)  # 2 rows of 73 bytes per read
    assert [k.tolist() for k in _key_columns(shard.path)] == want


@pytest.mark.parametrize("damage", ["missing", "truncated", "not-npy", "symlink", "no-ident"])
def test_a_file_that_is_not_a_shard_is_not_indexed(tmp_path, damage):
    shard = Shard(tmp_path / "s.npy", [record(0, 0, 1), record(0, 1, 2)])
    path = tmp_path / "damaged.npy"
    if damage == "truncated":
        path.write_bytes(shard.data[:-3])
    elif damage == "not-npy":
        path.write_bytes(b"<html>" + shard.data)
    elif damage == "symlink":
        path.symlink_to(shard.path)
    elif damage == "no-ident":
        np.save(path, np.zeros(2, [("blake3", "u1", (32,)), ("desc", "<f4", (4,))]))
    assert _key_columns(path) is None


def test_threads_look_up_and_add_at_once(tmp_path):
    base = [Shard(tmp_path / f"b{i}.npy", [record(i, 0, i)], logical=f"15/{i}") for i in range(8)]
    store = DescriptorStore(lambda: [s.source for s in base])
    errors = []

    def work(t: int) -> None:
        try:
            for round_ in range(20):
                i = 100 + 10 * t + round_ % 10
                mine = Shard(tmp_path / f"t{t}-{round_}.npy", [record(i, 1, i)])
                store.add(mine.source, [digest(i)], IDENT)
                got = store.reuser(IDENT, COLS, f"15/{t}")(keys((7, 7, t % 8), (7, 8, i)))
                assert values(got) == [t % 8, i]
        except AssertionError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and store.scanned == 8
