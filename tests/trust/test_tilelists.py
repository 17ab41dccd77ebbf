"""Manifest schema 3 from the attacker's side: a real built cache signs a root of tile lists, and
every edit of a tile, a list or the root's view of them is refused with its named reason."""
from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import blake3
import pytest

from c10.errors import ManifestWriteError, VerifyError
from c10.store.layout import LIST_KEYS, LISTS_DIR, MANIFEST_NAME, list_relpath, tagged_relpath
from c10.trust import manifest as mf
from c10.trust.keys import load_signing_key, load_trusted_keys
from c10.trust.tilelists import (
    LIST_KIND,
    LIST_MAX,
    block_size,
    expand_files,
    list_block,
    parse_tile_list,
)
from c10.trust.verify import EXIT_CODES, verify_cache


def root_of(cache: Path) -> dict:
    return mf.loads_manifest((cache / MANIFEST_NAME).read_bytes())


def lists_of(cache: Path) -> list[dict]:
    return [f for f in root_of(cache)["files"] if f["kind"] == LIST_KIND]


def refused(cache: Path, pub: Path, reason: str, path: str | None = None, **kw) -> VerifyError:
    with pytest.raises(VerifyError) as info:
        verify_cache(cache, trusted=load_trusted_keys([pub]), now=dt.datetime.now(dt.timezone.utc),
                     state_path=None, **kw)
    assert info.value.reason == reason, info.value
    assert info.value.exit_code == EXIT_CODES[reason]
    if path is not None:
        assert info.value.path == path, info.value
    return info.value


def verified(cache: Path, pub: Path, **kw):
    return verify_cache(cache, trusted=load_trusted_keys([pub]),
                        now=dt.datetime.now(dt.timezone.utc), state_path=None, **kw)


def resign(cache: Path, operator_key, body: dict) -> None:
    """What a builder holding the operator's key signs (the parser's last line of defence)."""
    key = load_signing_key(operator_key[0], passphrase=None, cache_root=None)
    mf.write_signed_manifest(cache, mf.dumps_manifest(body), key)


def sign_by_hand(cache: Path, operator_key, body: dict) -> None:
    """A root signed without write_signed_manifest's own check (which refuses what follows)."""
    from c10.canonical import canonical_json
    from c10.store.layout import ENVELOPE_NAME
    from c10.trust.dsse import PAYLOAD_TYPE, sign_envelope

    key = load_signing_key(operator_key[0], passphrase=None, cache_root=None)
    data = mf.dumps_manifest(body)
    (cache / ENVELOPE_NAME).write_bytes(
        canonical_json(sign_envelope(data, PAYLOAD_TYPE, key)) + b"\n")
    (cache / MANIFEST_NAME).write_bytes(data)


def swap_list(cache: Path, operator_key, old: dict, body: dict | bytes) -> str:
    """Replace list `old` by new bytes under their content name, and sign a root naming it."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    logical = list_relpath(list_block(old["path"]))
    rel = tagged_relpath(logical, blake3.blake3(data).hexdigest())
    (cache / rel).write_bytes(data)
    (cache / old["path"]).unlink()
    root = root_of(cache)
    root["files"] = [f for f in root["files"] if f["path"] != old["path"]]
    root["files"].append({"path": rel, "size": len(data), "blake3": blake3.blake3(data).hexdigest(),
                          "kind": LIST_KIND})
    resign(cache, operator_key, root)
    return rel


def body_of(cache: Path, entry: dict) -> dict:
    return json.loads((cache / entry["path"]).read_bytes())


# ---------------------------------------------------------------- what a build signs

def test_a_built_cache_signs_a_root_of_tile_lists(built_cache, pub):
    from c10.plan import load_plan
    from c10.store.hashcache import HashCache

    root = root_of(built_cache)
    plan = load_plan(built_cache, HashCache(built_cache))
    assert root["schema_version"] == 3
    assert not [f for f in root["files"] if f["kind"] == "tile"]
    lists = lists_of(built_cache)
    blocks = {list_block(f["path"]) for f in lists}
    assert len(blocks) == len(lists) > 1  # one list per block (4x4-tile blocks)
    files = expand_files(built_cache, root)
    tiles = {f["path"] for f in files if f["kind"] == "tile"}
    assert tiles == {t.path for t in plan.tiles}
    assert verified(built_cache, pub).files == len(files) == len(root["files"]) + len(tiles)
    assert sorted(p.relative_to(built_cache).as_posix()
                  for p in (built_cache / LISTS_DIR).rglob("*.json")) == sorted(
        f["path"] for f in lists)


def test_the_build_hint_of_signed_tiles_is_every_listed_tile(built_cache, pub):
    """The descriptor store's hint takes the digests by position, not by parse: the same tiles,
    from the keys the commit kept or, without them, from the lists, where a list that fails its
    root entry lists nothing (a missing key costs a computation)."""
    root = root_of(built_cache)
    tiles = [f for f in expand_files(built_cache, root) if f["kind"] == "tile"]
    every = sorted(bytes.fromhex(f["blake3"])[:8] for f in tiles)
    assert (built_cache / LIST_KEYS).is_file()
    assert hint(built_cache, pub) == every
    (built_cache / LIST_KEYS).unlink()
    assert hint(built_cache, pub) == every
    first = lists_of(built_cache)[0]
    gone = {f["path"] for f in parse_tile_list(
        (built_cache / first["path"]).read_bytes(), first["path"], block_size(root))}
    (built_cache / first["path"]).write_bytes(b"{}")
    kept = sorted(bytes.fromhex(f["blake3"])[:8] for f in tiles if f["path"] not in gone)
    assert hint(built_cache, pub) == kept and kept


def hint(root: Path, pub: Path) -> list[bytes]:
    from c10.trust.keys import load_trusted_keys
    from c10.trust.provenance import Provenance

    keys = Provenance(root, load_trusted_keys([pub])).signed_tile_keys()
    assert list(keys) == sorted(keys)
    return sorted(int(k).to_bytes(8, "little") for k in keys)


def test_the_commit_keeps_each_signed_lists_keys(built_cache):
    """LIST_KEYS holds, for exactly the lists the root signs, the keys of the tiles each lists."""
    from c10.store.listkeys import read_list_keys

    root = root_of(built_cache)
    kept = read_list_keys(built_cache)
    assert set(kept) == {f["blake3"] for f in lists_of(built_cache)}
    for entry in lists_of(built_cache):
        listed = parse_tile_list((built_cache / entry["path"]).read_bytes(), entry["path"],
                                 block_size(root))
        assert sorted(kept[entry["blake3"]].tolist()) == sorted(
            int.from_bytes(bytes.fromhex(f["blake3"])[:8], "little") for f in listed)


@pytest.mark.parametrize("junk", [b"", b"c10 tile-list keys 1\n", b"\0" * 64,
                                  b"c10 tile-list keys 1\n\x05\0\0\0\0\0\0\0[[1]]",
                                  b"c10 tile-list keys 1\n\xff\xff\xff\xff\xff\xff\xff\x7f",
                                  b"c10 tile-list keys 1\n\x0a\0\0\0\0\0\0\0"
                                  b'[["a",-1]]\0\0\0\0\0\0\0\0'])
def test_a_torn_or_junk_keys_file_is_read_as_none(built_cache, pub, junk):
    """Anything but a whole keys file of ours is no keys: the hint reads the lists again."""
    from c10.store.listkeys import read_list_keys

    (built_cache / LIST_KEYS).write_bytes(junk)
    assert read_list_keys(built_cache) == {}
    root = root_of(built_cache)
    assert hint(built_cache, pub) == sorted(
        bytes.fromhex(f["blake3"])[:8] for f in expand_files(built_cache, root)
        if f["kind"] == "tile")


def test_a_truncated_keys_file_is_read_as_none(built_cache):
    from c10.store.listkeys import read_list_keys

    data = (built_cache / LIST_KEYS).read_bytes()
    (built_cache / LIST_KEYS).write_bytes(data[:-8])
    assert read_list_keys(built_cache) == {}


def test_nothing_is_signed_until_the_unsynced_writes_are_durable(built_cache, operator_key,
                                                              monkeypatch):
    """Shards and lists are written without an fsync each; the commit syncs the file system
    first, and a writeback error there leaves the committed pair as it was."""
    import ctypes
    import errno

    from c10.errors import StorageError
    from c10.store import atomic
    from c10.store.layout import ENVELOPE_NAME

    before = [(built_cache / n).read_bytes() for n in (MANIFEST_NAME, ENVELOPE_NAME)]
    body = root_of(built_cache) | {"version": root_of(built_cache)["version"] + 1}

    def eio(fd):
        ctypes.set_errno(errno.EIO)
        return -1

    monkeypatch.setattr(atomic, "_syncfs", eio)
    with pytest.raises(StorageError):
        resign(built_cache, operator_key, body)
    assert [(built_cache / n).read_bytes() for n in (MANIFEST_NAME, ENVELOPE_NAME)] == before


def test_flat_schemas_are_read_as_they_are(tmp_path):
    flat = {"schema_version": 2, "files": [{"path": "tiles/1/0/0.jpg"}]}
    assert expand_files(tmp_path, flat) is flat["files"]  # no tile list is opened


# ---------------------------------------------------------------- tampering, unsigned

def test_a_tile_edited_against_its_list_is_hash_mismatch(built_cache, pub):
    rel = next(f for f in expand_files(built_cache, root_of(built_cache))
               if f["kind"] == "tile")["path"]
    data = bytearray((built_cache / rel).read_bytes())
    data[-1] ^= 1
    (built_cache / rel).write_bytes(bytes(data))
    refused(built_cache, pub, "hash-mismatch", rel)


def test_a_list_edited_against_the_root_is_hash_mismatch(built_cache, pub):
    entry = lists_of(built_cache)[0]
    body = body_of(built_cache, entry)
    body["tiles"][0][2] = "0" * 64  # still a well-formed list: only its signed hash tells
    (built_cache / entry["path"]).write_bytes(mf.canonical_json(body) + b"\n")
    refused(built_cache, pub, "hash-mismatch", entry["path"])


def test_a_deleted_list_is_missing_file(built_cache, pub):
    entry = lists_of(built_cache)[0]
    (built_cache / entry["path"]).unlink()
    refused(built_cache, pub, "missing-file", entry["path"])


def test_an_extra_list_the_root_does_not_name_is_refused(built_cache, pub):
    entry = lists_of(built_cache)[0]
    extra = f"{LISTS_DIR}/15/0-0.{'ab' * 8}.json"  # a block the root has no list for
    (built_cache / extra).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(built_cache / entry["path"], built_cache / extra)
    refused(built_cache, pub, "extra-file", extra)
    (built_cache / extra).unlink()
    # a second list of a listed block whose bytes do not hash to its name
    twin = tagged_relpath(list_relpath(list_block(entry["path"])), "cd" * 32)
    shutil.copyfile(built_cache / entry["path"], built_cache / twin)
    refused(built_cache, pub, "extra-file", twin)
    (built_cache / twin).unlink()
    # one that does (a build stopped before its commit) is pending on the ground, never read
    data = (built_cache / entry["path"]).read_bytes().replace(b"]]}", b"]] }")
    twin = tagged_relpath(list_relpath(list_block(entry["path"])), blake3.blake3(data).hexdigest())
    (built_cache / twin).write_bytes(data)
    assert verified(built_cache, pub).pending == 1


def test_a_junk_file_in_the_lists_dir_is_refused(built_cache, pub):
    (built_cache / LISTS_DIR / "notes.txt").write_bytes(b"junk")
    refused(built_cache, pub, "extra-file", f"{LISTS_DIR}/notes.txt")


# ---------------------------------------------------------------- signed, still refused

def _outside_block(cache, body):
    z, bx, by = body["block"]
    body["tiles"].append([f"tiles/{z}/{(bx + 1) * 4}/{by * 4}.jpg", 1, "0" * 64])


def _outside_tiles(cache, body):
    body["tiles"].append(["models/global.onnx", 1, "0" * 64])


def _twice(cache, body):
    body["tiles"].append(list(body["tiles"][-1]))


def _from_another_list(cache, body):
    other = [f for f in lists_of(cache)][1]
    body["tiles"].append(body_of(cache, other)["tiles"][0])  # the same tile in two lists
    body["tiles"].sort()


def _wrong_block(cache, body):
    body["block"] = [body["block"][0], body["block"][1] + 1, body["block"][2]]


def _extra_key(cache, body):
    body["sources"] = []


def _bad_row(cache, body):
    body["tiles"][0] = body["tiles"][0][:2]


@pytest.mark.parametrize("edit", [_outside_block, _outside_tiles, _twice, _from_another_list,
                                  _wrong_block, _extra_key, _bad_row])
def test_a_signed_list_of_the_wrong_tiles_is_bad_manifest(built_cache, pub, operator_key, edit):
    entry = lists_of(built_cache)[0]
    body = body_of(built_cache, entry)
    edit(built_cache, body)
    rel = swap_list(built_cache, operator_key, entry, body)
    refused(built_cache, pub, "bad-manifest", rel)


@pytest.mark.parametrize("data", [b"not json", b'{"block":[15,0,0],"block":[15,0,0],"tiles":[]}',
                                  b'{"block":[15,0,0],"tiles":[NaN]}', b"\xff\xfe", b"[]"])
def test_signed_junk_json_in_a_list_is_bad_manifest(built_cache, pub, operator_key, data):
    rel = swap_list(built_cache, operator_key, lists_of(built_cache)[0], data)
    refused(built_cache, pub, "bad-manifest", rel)


def test_an_oversized_list_is_refused_before_it_is_read(built_cache, pub, operator_key,
                                                        monkeypatch):
    entry = lists_of(built_cache)[0]
    root = root_of(built_cache)
    for f in root["files"]:
        if f["path"] == entry["path"]:
            f["size"] = LIST_MAX + 1
    sign_by_hand(built_cache, operator_key, root)
    refused(built_cache, pub, "bad-manifest", MANIFEST_NAME)
    with pytest.raises(VerifyError, match="more than"):  # and the parser's own bound
        parse_tile_list(b" " * (LIST_MAX + 1), entry["path"], 4)


@pytest.mark.parametrize("change", ["tile-in-root", "list-kind-elsewhere", "two-lists-one-block",
                                    "not-a-list-name"])
def test_a_signed_root_that_misplaces_lists_is_bad_manifest(built_cache, pub, operator_key,
                                                             change):
    root = root_of(built_cache)
    entry = next(f for f in root["files"] if f["kind"] == LIST_KIND)
    if change == "tile-in-root":
        tile = expand_files(built_cache, root)[-1]
        root["files"].append(tile)
    elif change == "list-kind-elsewhere":
        next(f for f in root["files"] if f["kind"] == "model")["kind"] = LIST_KIND
    elif change == "two-lists-one-block":
        twin = tagged_relpath(list_relpath(list_block(entry["path"])), "ef" * 32)
        shutil.copyfile(built_cache / entry["path"], built_cache / twin)
        root["files"].append(dict(entry, path=twin))
    else:
        entry["path"] = f"{LISTS_DIR}/15/list.json"
    with pytest.raises(ManifestWriteError, match="refusing to sign"):  # the builder refuses it
        resign(built_cache, operator_key, root)
    sign_by_hand(built_cache, operator_key, root)  # and so does the verifier
    refused(built_cache, pub, "bad-manifest", MANIFEST_NAME)


# ---------------------------------------------------------------- airborne

def test_airborne_is_still_strict_about_lists(built_cache, pub, tmp_path):
    from c10.features.backends import host_fingerprints
    from c10.tools.pack import pack

    image = tmp_path / "image"
    now = dt.datetime.now(dt.timezone.utc)
    pack(built_cache, image, trusted=load_trusted_keys([pub]), now=now)
    airborne = host_fingerprints()
    assert verified(image, pub, airborne_fingerprints=airborne).files == len(
        expand_files(image, root_of(image)))
    entry = lists_of(image)[0]
    # a second, well-formed list of a listed block: ground verify would take it for a pending one
    data = (image / entry["path"]).read_bytes().replace(b"]]}", b"]] }")
    twin = tagged_relpath(list_relpath(list_block(entry["path"])), blake3.blake3(data).hexdigest())
    (image / twin).write_bytes(data)
    refused(image, pub, "extra-file", twin, airborne_fingerprints=airborne)
    (image / twin).unlink()
    (image / entry["path"]).chmod(0o664)
    refused(image, pub, "bad-mode", entry["path"], airborne_fingerprints=airborne)


def test_the_aircraft_reads_tiles_only_through_checked_lists(built_cache, pub):
    from c10.query.flight import FlightCache

    cache = FlightCache.open(built_cache, [pub])
    tiles = {f["path"] for f in expand_files(built_cache, root_of(built_cache))
             if f["kind"] == "tile"}
    assert set(cache.tiles.values()) == tiles
    tile = next(iter(cache.tiles))
    assert cache.read(cache.tiles[tile]) == (built_cache / cache.tiles[tile]).read_bytes()
    entry = lists_of(built_cache)[-1]
    (built_cache / entry["path"]).unlink()
    with pytest.raises(VerifyError) as info:
        FlightCache.open(built_cache, [pub])
    assert (info.value.reason, info.value.path) == ("missing-file", entry["path"])
