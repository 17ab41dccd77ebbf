"""Laundering, tried as an attacker who can write the cache but holds no key: a derived file forged
in place, with its ref, doit's DB and the hash cache edited to match, never reaches a Manifest;
rows are carried forward only from signed shards; the next build repairs what was refused."""
from __future__ import annotations

import io
import json
import sqlite3

import blake3
import numpy as np
from conftest import built, current, rewrite

from c10.features.shards import read_shard
from c10.rules.driver import run_build
from c10.trust.keys import load_trusted_keys
from c10.trust.verify import verify_cache


def forge_shard(root, logical: str) -> bytes:
    """Replace a shard in place with other descriptors, and make every hint agree with it: its
    ref and doit's recorded value name the new bytes (the hash cache recomputes from the stat)."""
    path = current(root, logical)
    rows = read_shard(path)
    rows["desc"] = rows["desc"][::-1].copy()  # every tile gets another tile's descriptor
    buf = io.BytesIO()
    np.save(buf, rows, allow_pickle=False)
    data = buf.getvalue()
    path.write_bytes(data)
    digest = blake3.blake3(data).hexdigest()
    ref = root / ".c10/refs" / f"{logical}.json"
    entry = json.loads(ref.read_bytes()) | {"size": len(data), "blake3": digest}
    ref.write_text(json.dumps(entry, sort_keys=True))
    db = sqlite3.connect(root / ".c10/doit.sqlite")
    task = "shards:" + logical.removeprefix("shards/").removesuffix(".npy")
    (data_json,) = db.execute("select task_data from doit where task_id=?", (task,)).fetchone()
    state = json.loads(data_json)
    state["_values_:"]["refs"][logical] = entry
    db.execute("update doit set task_data=? where task_id=?", (json.dumps(state), task))
    db.commit()
    db.close()
    return data


def touch_other_block(root, logical: str) -> None:
    """A real change elsewhere, so the next build writes a new index and Manifest."""
    block = logical.split("/")[-1].removesuffix(".npy")
    tiles = sorted((root / "tiles/15").rglob("*.jpg"))
    other = next(t for t in tiles if f"{int(t.parent.name) // 4}-{int(t.stem) // 4}" != block)
    rewrite(other, tiles[0].read_bytes() if other != tiles[0] else tiles[1].read_bytes())


def shard_logicals(root) -> list[str]:
    refs = root / ".c10/refs/shards/global"
    return sorted(f"shards/global/{p.relative_to(refs).as_posix().removesuffix('.json')}"
                  for p in refs.rglob("*.json"))


def verifies(root, pub) -> None:
    verify_cache(root, trusted=load_trusted_keys([pub]), now=_now(), state_path=None)


def _now():
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc)


def test_a_shard_forged_in_place_is_never_signed_and_the_next_build_repairs_it(cache, capsys,
                                                                             operator_key):
    built(cache, capsys)
    manifest = (cache / "Manifest.json").read_bytes()
    logical = shard_logicals(cache)[1]
    original = current(cache, logical).read_bytes()
    forged = forge_shard(cache, logical)
    touch_other_block(cache, logical)
    code = run_build(cache)
    out = capsys.readouterr().out
    assert code != 0 and "ManifestWriteError" in out and "was not written by this build" in out
    assert (cache / "Manifest.json").read_bytes() == manifest  # nothing was signed
    assert blake3.blake3(forged).hexdigest() not in manifest.decode()
    built(cache, capsys)  # the refused shard was queued for a rebuild
    assert current(cache, logical).read_bytes() == original
    verifies(cache, operator_key[1])


def test_rows_are_carried_forward_only_from_the_signed_shard(cache, capsys, operator_key):
    built(cache, capsys)
    logical = shard_logicals(cache)[2]
    original = read_shard(current(cache, logical))
    forge_shard(cache, logical)
    # a change inside the same block: the shard rebuilds, reusing every other tile's row
    block_tiles = [t for t in sorted((cache / "tiles/15").rglob("*.jpg"))
                   if f"{int(t.parent.name) // 4}-{int(t.stem) // 4}"
                   == logical.split("/")[-1].removesuffix(".npy")]
    rewrite(block_tiles[0], block_tiles[-1].read_bytes())
    built(cache, capsys)
    rebuilt = read_shard(current(cache, logical))
    np.testing.assert_allclose(rebuilt["desc"][1:], original["desc"][1:], atol=1e-6)
    verifies(cache, operator_key[1])


def test_an_engine_swapped_in_place_is_refused_and_recompiled(cache, capsys, operator_key):
    built(cache, capsys)
    manifest = (cache / "Manifest.json").read_bytes()
    engine = next((cache / "engines").glob("global-*.onnx"))
    sidecar = engine.with_suffix(".json")
    data = bytearray(engine.read_bytes())
    data[-1] ^= 1  # still loads as an ONNX for some runtimes; the point is its bytes differ
    engine.write_bytes(bytes(data))
    meta = json.loads(sidecar.read_bytes())
    meta["engine_blake3"] = blake3.blake3(bytes(data)).hexdigest()
    sidecar.write_text(json.dumps(meta))
    touch_other_block(cache, shard_logicals(cache)[0])
    code = run_build(cache)
    out = capsys.readouterr().out
    assert code != 0 and "was not written by this build" in out and engine.name in out
    assert (cache / "Manifest.json").read_bytes() == manifest and not sidecar.exists()
    out = built(cache, capsys)
    assert "1 built" in out  # compiled again from the ONNX
    verifies(cache, operator_key[1])


def test_a_build_stopped_before_its_commit_carries_its_work_forward(cache, capsys):
    """What this host's builds wrote (the ledger, outside the cache) is trusted though no Manifest
    signed it yet: a cold build cut after its shards does not embed them again."""
    assert run_build(cache, ["shards"]) == 0
    capsys.readouterr()
    built(cache, capsys)
    report = json.loads((cache / ".c10/report.json").read_bytes())
    assert report["descriptors_generated"] == 0 and report["outcome"] == "success"
