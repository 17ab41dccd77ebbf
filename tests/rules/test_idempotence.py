"""Idempotence on content (seed CP-INV-1, CP-TC-2): IDEMPOTENT_NO_OP only for an intact committed
pair, a re-sign margin that follows the validity period, and no new version when doit re-decides
(a lost DB, a moved cache) and the content is what the committed, verified Manifest signs."""
from __future__ import annotations

import base64
import datetime as dt
import json
import re
import shutil

from conftest import build, built, executed, rewrite
from listing import listed_files

from c10.cli import main as c10_main
from c10.report import BuildOutcome, read_report
from c10.store.digest import blake3_file

MANIFEST, ENVELOPE, DB = "Manifest.json", "Manifest.json.dsse", ".c10/doit.sqlite"


def verify(root, pub, tmp_path) -> int:
    return c10_main(["verify", str(root), "--trusted-keys", str(pub), "--state",
                     str(tmp_path / "verify-state.json")])


def signed_payload(root) -> bytes:
    return base64.b64decode(json.loads((root / ENVELOPE).read_bytes())["payload"])


def version(root) -> int:
    return json.loads((root / MANIFEST).read_bytes())["version"]


def assert_repaired(root, capsys, pub, tmp_path) -> None:
    """The next build re-signs the Manifest (a new version of the same files), and it verifies."""
    listed = [f["path"] for f in json.loads(signed_payload(root))["files"]]
    code, out = build(root, capsys)
    assert code == 0, out
    assert executed(out) == ["coverage", "manifest"]
    assert read_report(root).outcome is BuildOutcome.SUCCESS
    assert (root / MANIFEST).read_bytes() == signed_payload(root) and version(root) == 2
    assert [f["path"] for f in json.loads(signed_payload(root))["files"]] == listed
    assert verify(root, pub, tmp_path) == 0
    code, out = build(root, capsys)  # and then it is a no-op again
    assert executed(out) == ["coverage"]
    assert read_report(root).outcome is BuildOutcome.IDEMPOTENT_NO_OP


def test_one_byte_of_a_file_entry_changed_is_repaired_not_a_no_op(cache, capsys, operator_key,
                                                                   tmp_path):
    """CP-INV-1 from the attacker's side: Manifest.json with one hex digit of a listed file's
    blake3 changed (the tail, which holds version and tiles hash, is left as it was) is not an
    intact commit: the build re-signs, it does not report IDEMPOTENT_NO_OP."""
    built(cache, capsys)
    data = (cache / MANIFEST).read_bytes()
    at = re.search(rb'"blake3":"([0-9a-f])', data).start(1)
    digit = b"0" if data[at:at + 1] != b"0" else b"1"
    (cache / MANIFEST).write_bytes(data[:at] + digit + data[at + 1:])
    assert verify(cache, operator_key[1], tmp_path) != 0
    assert_repaired(cache, capsys, operator_key[1], tmp_path)


def test_reordered_but_equal_manifest_is_repaired_not_a_no_op(cache, capsys, operator_key,
                                                              tmp_path):
    """CP-INV-1: the same JSON with its keys in another order and indented parses equal but is not
    the signed payload: the build re-signs it."""
    built(cache, capsys)
    body = json.loads((cache / MANIFEST).read_bytes())
    reordered = {key: body[key] for key in reversed(list(body))}
    (cache / MANIFEST).write_text(json.dumps(reordered, indent=1))
    assert json.loads((cache / MANIFEST).read_bytes()) == body
    assert_repaired(cache, capsys, operator_key[1], tmp_path)


def test_a_one_day_validity_is_not_re_signed_on_every_build(cache, capsys, monkeypatch):
    """CP-INV-1, CP-TC-2: with signing.validity_days = 1 the re-sign margin is a tenth of it (2.4
    hours), not a whole day: a second build is a no-op; only near expiry is it re-signed."""
    from c10.rules import manifest

    text = (cache / "c10.toml").read_text()
    (cache / "c10.toml").write_text(re.sub(r"(# )?validity_days = \d+", "validity_days = 1", text))
    built(cache, capsys)
    body = json.loads((cache / MANIFEST).read_bytes())
    assert body["expires"] != body["issued_at"] and body["request"]["signing"]["validity_days"] == 1
    first = (cache / MANIFEST).read_bytes()
    code, out = build(cache, capsys)
    assert code == 0 and executed(out) == ["coverage"]
    assert read_report(cache).outcome is BuildOutcome.IDEMPOTENT_NO_OP
    assert (cache / MANIFEST).read_bytes() == first
    start = manifest.now()
    monkeypatch.setattr(manifest, "now", lambda: start + dt.timedelta(hours=21))  # 3 h left
    assert executed(build(cache, capsys)[1]) == ["coverage"]
    monkeypatch.setattr(manifest, "now", lambda: start + dt.timedelta(hours=22))  # 2 h left
    code, out = build(cache, capsys)
    assert code == 0 and executed(out) == ["coverage", "manifest"] and version(cache) == 2
    assert manifest.resign_margin(1) == dt.timedelta(hours=2, minutes=24)
    assert manifest.resign_margin(30) == dt.timedelta(days=1)


def test_moved_cache_without_its_doit_db_is_a_no_op(cache, capsys, operator_key, tmp_path):
    """CP-INV-1, CP-TC-2: the cache moved to another path and its doit DB lost: doit re-decides
    every task by content, and as nothing changed (same build identity, same files as the
    committed, verified Manifest) no version is signed: the Manifest is left untouched and the
    outcome is IDEMPOTENT_NO_OP."""
    built(cache, capsys)
    before = (cache / MANIFEST).read_bytes(), (cache / ENVELOPE).read_bytes()
    moved = tmp_path / "elsewhere" / "sector"
    moved.parent.mkdir()
    shutil.move(cache, moved)
    (moved / DB).unlink()
    code, out = build(moved, capsys)
    assert code == 0, out
    assert "manifest" in executed(out), out
    report = read_report(moved)
    assert report.outcome is BuildOutcome.IDEMPOTENT_NO_OP, out
    assert (report.engines_built, report.descriptors_generated) == (0, 0)
    assert report.manifest_version == 1
    assert ((moved / MANIFEST).read_bytes(), (moved / ENVELOPE).read_bytes()) == before
    assert verify(moved, operator_key[1], tmp_path) == 0
    code, out = build(moved, capsys)  # the DB is whole again: only the gate runs
    assert executed(out) == ["coverage"] and (moved / MANIFEST).read_bytes() == before[0]


def test_lost_doit_db_with_changed_content_signs_a_new_version(cache, capsys, tmp_path):
    """CP-INV-1: the lost DB does not hide a change: a tile with other bytes gets a new version
    signed over its new bytes (SUCCESS), the same as with the DB."""
    built(cache, capsys)
    tiles = sorted((cache / "tiles/15").rglob("*.jpg"))
    rewrite(tiles[4], tiles[0].read_bytes())
    (cache / DB).unlink()
    code, out = build(cache, capsys)
    assert code == 0, out
    assert read_report(cache).outcome is BuildOutcome.SUCCESS and version(cache) == 2
    entry = {f["path"]: f for f in listed_files(cache)}
    assert entry[tiles[4].relative_to(cache).as_posix()]["blake3"] == blake3_file(tiles[4])


def test_a_pair_signed_by_another_key_is_never_taken_as_committed(cache, capsys, operator_key,
                                                                  tmp_path):
    """CP-INV-1 from the attacker's side: the same content re-signed by a key the operator does not
    hold (Manifest.json is the payload, byte for byte) and the DB lost: the build does not leave it
    as the committed Manifest, it signs a new version with the operator's key."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from c10.canonical import canonical_json
    from c10.trust.dsse import PAYLOAD_TYPE, sign_envelope

    built(cache, capsys)
    payload = (cache / MANIFEST).read_bytes()
    forged = sign_envelope(payload, PAYLOAD_TYPE, Ed25519PrivateKey.generate())
    (cache / ENVELOPE).write_bytes(canonical_json(forged) + b"\n")
    (cache / DB).unlink()
    code, out = build(cache, capsys)
    assert code == 0, out
    assert read_report(cache).outcome is BuildOutcome.SUCCESS and version(cache) == 2
    assert verify(cache, operator_key[1], tmp_path) == 0
