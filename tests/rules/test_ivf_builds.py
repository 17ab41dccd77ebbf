"""IVF index builds by real doit runs: a quantizer trained once, lists updated per changed shard,
bytes equal to a clean assembly with the same quantizer; retrained when asked."""
from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
from conftest import built, current, executed, make_cache, plan_of

from c10.errors import VerifyError
from c10.query.flight import FlightCache
from c10.trust.keys import load_trusted_keys
from c10.trust.verify import verify_cache

FACTORY = "IVF4,SQ8"


def tiles_of(root: Path) -> list[Path]:
    return sorted((root / "tiles").rglob("*.jpg"))


def index_files(root: Path) -> dict[str, bytes]:
    return {rel: current(root, rel).read_bytes() for rel in
            ("index/global.faiss", "index/global.ids.npy", "index/global.trained.faiss",
             "index/global.trained.json")}


def set_index(root: Path, line: str) -> None:
    toml = root / "c10.toml"
    toml.write_text(toml.read_text().replace("[index]\n", f"[index]\n{line}\n"))


def flip_near_end(path: Path) -> None:
    """Flip one byte 100 bytes before the end, in place (same inode, same size)."""
    with open(path, "r+b") as f:
        f.seek(-100, 2)
        byte = f.read(1)
        f.seek(-100, 2)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.fixture
def ivf_cache(tmp_path, inputs, operator_key) -> Path:
    return make_cache(tmp_path / "cache", inputs, operator_key, factory=FACTORY)


def test_incremental_update_equals_a_clean_build_with_the_same_quantizer(ivf_cache, capsys,
                                                                          tmp_path):
    tiles = tiles_of(ivf_cache)
    held = tmp_path / "held"
    held.mkdir()
    for tile in tiles[::7]:  # some tiles come later
        shutil.move(tile, held / f"{tile.parent.name}-{tile.name}")
    built(ivf_cache, capsys)
    first = index_files(ivf_cache)
    for moved in held.iterdir():  # they arrive, and others go
        x, name = moved.name.split("-")
        shutil.move(moved, ivf_cache / "tiles/15" / x / name)
    for tile in tiles[3::11]:
        tile.unlink()
    out = built(ivf_cache, capsys)
    assert "index:global" in executed(out)
    grown = index_files(ivf_cache)
    # the quantizer was not retrained on the new tiles
    assert grown["index/global.trained.faiss"] == first["index/global.trained.faiss"]
    assert grown["index/global.faiss"] != first["index/global.faiss"]
    ids = np.load(current(ivf_cache, "index/global.ids.npy"))
    assert len(ids) == len(tiles_of(ivf_cache)) == faiss.deserialize_index(
        np.frombuffer(grown["index/global.faiss"], np.uint8)).ntotal
    # a clean assembly from the same quantizer: no cached encoding, no index
    shutil.rmtree(ivf_cache / ".c10/ivf")
    for rel in ("index/global.faiss", "index/global.ids.npy"):
        (ivf_cache / f".c10/refs/{rel}.json").unlink()
    out = built(ivf_cache, capsys)
    assert "index:global" in executed(out)
    assert index_files(ivf_cache) == grown
    # the quantizer's sample was the first build's tiles
    meta = json.loads(grown["index/global.trained.json"])
    assert meta["sample"]["of"] == len(tiles) - len(tiles[::7])


def test_retrained_when_train_generation_is_bumped(ivf_cache, capsys):
    built(ivf_cache, capsys)
    first = index_files(ivf_cache)
    for tile in tiles_of(ivf_cache)[::5]:
        tile.unlink()
    built(ivf_cache, capsys)
    assert index_files(ivf_cache)["index/global.trained.json"] == \
        first["index/global.trained.json"]
    set_index(ivf_cache, "train_generation = 2")
    out = built(ivf_cache, capsys)
    assert "index:global" in executed(out)
    meta = json.loads(index_files(ivf_cache)["index/global.trained.json"])
    assert meta["train_generation"] == 2 and meta["sample"]["of"] == len(tiles_of(ivf_cache))
    assert executed(built(ivf_cache, capsys)) == ["coverage"]


def test_the_quantizer_is_signed_and_the_cache_verifies(ivf_cache, capsys, operator_key):
    built(ivf_cache, capsys)
    listed = {f["path"]: f["kind"] for f in
              json.loads((ivf_cache / "Manifest.json").read_bytes())["files"]}
    for rel in ("index/global.trained.faiss", "index/global.trained.json"):
        assert listed[current(ivf_cache, rel).relative_to(ivf_cache).as_posix()] == "index"
    assert list((ivf_cache / ".c10/ivf/global").rglob("*.rows"))  # encodings: control, unlisted
    verify_cache(ivf_cache, trusted=load_trusted_keys([str(operator_key[1])]),
                 now=dt.datetime.now(dt.timezone.utc), state_path=None)


def test_a_planted_encoding_is_encoded_again_not_used(ivf_cache, capsys):
    built(ivf_cache, capsys)
    before = index_files(ivf_cache)
    for path in (ivf_cache / ".c10/ivf/global").rglob("*.rows"):
        data = path.read_bytes()
        path.write_bytes(data[len(data) // 2:] + data[:len(data) // 2])  # rows swapped around
    (ivf_cache / ".c10/refs/index/global.faiss.json").unlink()
    out = built(ivf_cache, capsys)
    assert "index:global" in executed(out)
    assert index_files(ivf_cache) == before


def test_a_planted_quantizer_is_not_used(ivf_cache, capsys):
    built(ivf_cache, capsys)
    before = index_files(ivf_cache)
    logical = "index/global.trained.faiss"
    path = current(ivf_cache, logical)
    other = faiss.index_factory(64, "IVF4,SQ8", faiss.METRIC_INNER_PRODUCT)
    other.train(np.random.default_rng(5).standard_normal((200, 64)).astype(np.float32))
    data = faiss.serialize_index(other).tobytes()
    path.write_bytes(data)  # forged in place, its ref made to agree
    import blake3

    ref = ivf_cache / f".c10/refs/{logical}.json"
    ref.write_text(json.dumps(json.loads(ref.read_bytes()) | {
        "size": len(data), "blake3": blake3.blake3(data).hexdigest()}, sort_keys=True))
    built(ivf_cache, capsys)
    # the forged quantizer was ignored: the one trained on these tiles came back
    assert index_files(ivf_cache) == before


def test_the_flight_cache_maps_the_index_and_refuses_a_tampered_one(ivf_cache, capsys, pub):
    built(ivf_cache, capsys)
    cache = FlightCache.open(ivf_cache, [pub])
    searcher, _ = cache.searcher()
    ivf = faiss.extract_index_ivf(searcher.index)
    assert type(faiss.downcast_InvertedLists(ivf.invlists)).__name__ == "OnDiskInvertedLists"
    assert ivf.nprobe == 16
    frame = tiles_of(ivf_cache)[3]
    z, x, y = 15, int(frame.parent.name), int(frame.stem)
    assert (searcher.query_file(frame, 1)[0].z, searcher.query_file(frame, 1)[0].x,
            searcher.query_file(frame, 1)[0].y) == (z, x, y)
    del searcher, ivf, cache  # unmapped (a file truncated under a live map is a SIGBUS)
    index = current(ivf_cache, "index/global.faiss")
    flip_near_end(index)  # inside the inverted lists, which the map would read lazily
    with pytest.raises(VerifyError) as info:
        FlightCache.open(ivf_cache, [pub]).searcher()
    assert info.value.reason == "hash-mismatch" and info.value.path == \
        index.relative_to(ivf_cache).as_posix()


def test_a_write_between_the_check_and_the_map_is_refused(ivf_cache, capsys, pub, monkeypatch):
    built(ivf_cache, capsys)
    index = current(ivf_cache, "index/global.faiss")
    real = faiss.read_index

    def racing(path, flags):  # the attacker writes in place just as the file is mapped
        flip_near_end(index)
        return real(path, flags)

    monkeypatch.setattr(faiss, "read_index", racing)
    with pytest.raises(VerifyError, match="changed while it was being opened") as info:
        FlightCache.open(ivf_cache, [pub]).searcher()
    assert info.value.reason == "hash-mismatch"


def test_hnsw_stays_a_full_rebuild_with_its_old_task_key(tmp_path, inputs, operator_key, capsys):
    from c10.rules.index import index_key

    cache = make_cache(tmp_path / "hnsw", inputs, operator_key, factory="HNSW16,Flat")
    built(cache, capsys)
    plan = plan_of(cache)
    assert index_key(plan) == {"factory": "HNSW16,Flat", "metric": "ip", "ef_construction": 40,
                               "ef_search": 64}
    assert set(plan.config.request()["index"]) == {"factory", "metric", "ef_construction",
                                                   "ef_search"}
    assert plan.plans["global"].trained == ()
    assert not (cache / ".c10/ivf").exists()
    assert not (cache / ".c10/refs/index/global.trained.faiss.json").exists()
    searcher, _ = FlightCache.open(cache, [operator_key[1]]).searcher()
    assert faiss.downcast_index(searcher.index).hnsw.efSearch == 64


def test_leaving_ivf_for_hnsw_leaves_no_quantizer_nor_encodings(ivf_cache, capsys):
    built(ivf_cache, capsys)
    toml = ivf_cache / "c10.toml"
    toml.write_text(toml.read_text().replace(f'factory = "{FACTORY}"', 'factory = "HNSW16,Flat"'))
    built(ivf_cache, capsys)
    assert not (ivf_cache / ".c10/ivf/global").exists()
    assert not list((ivf_cache / "index").glob("global.trained.*"))
    assert not list((ivf_cache / ".c10/refs/index").glob("global.trained.*"))
