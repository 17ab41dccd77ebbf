"""Content-named shards and index files: a stopped build never touches what the last Manifest
lists."""
from __future__ import annotations

import datetime as dt
import json

import pytest
from conftest import build, built, current, current_files, executed
from hypothesis import given
from hypothesis import strategies as st

from c10.errors import VerifyError
from c10.store import refs
from c10.store.layout import ref_relpath, split_tagged, tagged_relpath
from c10.trust.keys import load_trusted_keys
from c10.trust.verify import verify_cache

HEX = "0123456789abcdef"


@given(st.sampled_from(["shards/g/15/12-34.npy", "index/g.faiss", "index/g.ids.npy",
                        "shards/a.b/0/0-0.npy"]),
       st.text(HEX, min_size=64, max_size=64))
def test_content_names_round_trip(logical, digest):
    tagged = tagged_relpath(logical, digest)
    assert split_tagged(tagged) == (logical, digest[:16]) and tagged != logical


@pytest.mark.parametrize("rel", ["shards/g/15/1-2.npy", "tiles/15/1/2.0123456789abcdef.jpg",
                                 "shards/g/15/1-2.0123456789ABCDEF.npy", "index/g.012345.faiss"])
def test_only_tagged_shard_and_index_names_split(rel):
    assert split_tagged(rel) is None


def test_publish_writes_the_file_then_its_ref(tmp_path):
    entry = refs.publish(tmp_path, "shards/g/15/1-2.npy", b"bytes")
    assert (tmp_path / entry["path"]).read_bytes() == b"bytes" and entry["size"] == 5
    assert refs.read_ref(tmp_path, "shards/g/15/1-2.npy") == entry
    assert refs.current_path(tmp_path, "shards/g/15/1-2.npy") == tmp_path / entry["path"]
    # a ref that names another artifact's file is not ours: ignored
    (tmp_path / ref_relpath("shards/g/15/9-9.npy")).write_text(json.dumps(entry))
    assert refs.read_ref(tmp_path, "shards/g/15/9-9.npy") is None
    assert not list((tmp_path / ".c10/tmp").iterdir())  # staged temp files all renamed


def test_a_ref_read_again_is_the_file_as_it_is_now(tmp_path):
    """read_ref keeps what it parsed by the ref's stat: a ref replaced, edited in place or removed
    is read as it is now, and a caller's change to an entry never reaches the next read."""
    import os

    logical = "shards/g/15/1-2.npy"
    first = refs.publish(tmp_path, logical, b"one")
    seen = refs.read_ref(tmp_path, logical)
    seen["size"] = 99
    assert refs.read_ref(tmp_path, logical) == first
    second = refs.publish(tmp_path, logical, b"second")
    assert refs.read_ref(tmp_path, logical) == second != first
    ref = tmp_path / ref_relpath(logical)
    with open(ref, "r+b") as f:  # in place, same size: the ctime still moves
        f.write(b"[" + f.read()[1:])
    assert refs.read_ref(tmp_path, logical) is None
    os.unlink(ref)
    assert refs.read_ref(tmp_path, logical) is None


def test_a_ref_write_that_fails_leaves_the_old_ref_and_no_temp_file(tmp_path, monkeypatch):
    import errno
    import os

    from c10.errors import StorageError

    logical = "shards/g/15/1-2.npy"
    old = refs.publish(tmp_path, logical, b"old")
    fsyncs = []
    monkeypatch.setattr(os, "fsync", lambda fd: fsyncs.append(fd))
    refs.write_ref(tmp_path, logical, {**old, "size": 4})
    assert not fsyncs  # a ref is a hint doit's saved value checks: never worth an fsync

    def enospc(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", enospc)
    with pytest.raises(StorageError, match="disk is full|cannot write"):
        refs.write_ref(tmp_path, logical, old)
    assert json.loads((tmp_path / ref_relpath(logical)).read_text())["size"] == 4
    assert not list((tmp_path / ".c10/tmp").iterdir())


def _verify(cache, operator_key, **kw):
    now = dt.datetime.now(dt.timezone.utc)
    return verify_cache(cache, trusted=load_trusted_keys([operator_key[1]]), now=now,
                        state_path=None, **kw)


def _reembed_everything(cache):
    toml = cache / "c10.toml"
    toml.write_text(toml.read_text().replace("mean = [0.485, 0.456, 0.406]",
                                             "mean = [0.5, 0.5, 0.5]", 1))


def test_a_build_stopped_before_its_commit_leaves_the_last_manifest_verifying(cache, capsys,
                                                                              operator_key):
    built(cache, capsys)
    committed = {p.relative_to(cache).as_posix(): p.read_bytes()
                 for p in [*cache.glob("shards/**/*.npy"), *cache.glob("index/*")]}
    _reembed_everything(cache)
    # every shard and the index rebuilt, no coverage, no Manifest
    code, out = build(cache, capsys, "index")
    assert code == 0 and "index:global" in executed(out), out
    result = _verify(cache, operator_key)
    now = {p.relative_to(cache).as_posix()
           for top in ("shards", "index") for p in current_files(cache, top).values()}
    # every shard and the index are new files; the id map has the same bytes, so the same name
    assert result.pending == len(now - set(committed)) == len(current_files(cache, "shards")) + 1
    assert all((cache / rel).read_bytes() == data for rel, data in committed.items())
    code, out = build(cache, capsys)
    assert code == 0 and executed(out) == ["coverage", "manifest"], out
    assert _verify(cache, operator_key).pending == 0
    # the old ones went
    assert {rel for rel in committed if (cache / rel).exists()} == set(committed) & now


def test_a_pending_name_must_match_its_bytes(cache, capsys, operator_key):
    built(cache, capsys)
    shard = sorted(current_files(cache, "shards/global/15").values())[0]
    fake = shard.with_name(shard.name.replace(split_tagged(shard.relative_to(cache).as_posix())[1],
                                              "0" * 16))
    fake.write_bytes(shard.read_bytes())
    with pytest.raises(VerifyError) as info:
        _verify(cache, operator_key)
    assert (info.value.reason == "extra-file"
            and info.value.path == fake.relative_to(cache).as_posix())
    fake.unlink()
    fake.with_name("notes.txt").write_text("operator notes")
    with pytest.raises(VerifyError, match="notes.txt"):
        _verify(cache, operator_key)


@pytest.mark.parametrize("damage", ["delete", "same-size", "ref-rewritten"])
def test_a_damaged_current_shard_or_ref_is_rebuilt(cache, capsys, operator_key, damage):
    built(cache, capsys)
    (logical, path), (_, neighbour) = sorted(current_files(cache, "shards/global").items())[:2]
    good = path.read_bytes()
    if damage == "delete":
        path.unlink()
    elif damage == "same-size":
        path.write_bytes(good[:-4] + b"\x00\x00\x00\x01")
    else:  # pointed elsewhere by a run that was killed before doit recorded it
        refs.publish(cache, logical, neighbour.read_bytes())
    code, out = build(cache, capsys)
    assert code == 0, out
    assert f"shards:{logical.removeprefix('shards/').removesuffix('.npy')}" in executed(out)
    assert current(cache, logical).read_bytes() == good
    assert _verify(cache, operator_key).pending == 0
