"""Manifest schema, canonical bytes, control allowlist, signed write, versioning, key allowlist."""
from __future__ import annotations

import base64
import json
import os
from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from c10.errors import ManifestWriteError, VerifyError
from c10.store.layout import is_control
from c10.trust import manifest as mf
from c10.trust.keys import check_key_allowed, keyid, ssh_fingerprint
from c10.trust.manifest import FileEntry, build_manifest, dumps_manifest, loads_manifest
from c10.trust.verify import verify_cache

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
H = "ab" * 32


def _files():
    return [FileEntry("tiles/18/1/2.jpg", 10, "11" * 32, "tile"),
            FileEntry("engines/net-k.onnx", 20, "22" * 32, "engine"),
            FileEntry("tiles/18/1/1.jpg", 30, "33" * 32, "tile")]


def _manifest(version=1, files=None, **over):
    args = dict(version=version, issued_at=T0, expires=T0 + timedelta(days=30),
                build_identity="bid", request={"area": {"zooms": [18]}, "b": 1},
                host={"os": "Linux"}, tools={"c10": "0.1.0"}, tiles_hash=H,
                files=_files() if files is None else files, cache_id="cache-1",
                engines=[{"path": "engines/net-k.onnx", "backend": "onnxruntime",
                          "fingerprint": "fp"}], schema=2)  # flat: the tiles in `files`
    args.update(over)
    return build_manifest(**args)


# ---------------------------------------------------------------- bytes

def test_dumps_is_deterministic_and_canonical():
    a = dumps_manifest(_manifest())
    b = dumps_manifest(_manifest(files=list(reversed(_files())),
                                 request={"b": 1, "area": {"zooms": [18]}}))
    assert a == b
    assert a.endswith(b"}\n") and a.count(b"\n") == 1
    assert b": " not in a and b", " not in a
    paths = [f["path"] for f in json.loads(a)["files"]]
    assert paths == sorted(paths)


def test_dumps_sorts_files_of_a_hand_made_dict_and_roundtrips():
    m = _manifest()
    m["files"] = list(reversed(m["files"]))
    data = dumps_manifest(m)
    assert dumps_manifest(loads_manifest(data)) == data


def test_dumps_is_utf8_not_ascii_escaped():
    data = dumps_manifest(_manifest(build_identity="Сектор-7"))
    assert "Сектор-7".encode() in data


def test_dumps_refuses_non_json_values():
    with pytest.raises(ManifestWriteError):
        dumps_manifest(_manifest(request={"x": float("nan")}))


def test_manifest_fields():
    m = _manifest()
    assert m["schema_version"] == 2 and mf.SCHEMA_VERSION == 3
    assert m["issued_at"] == "2026-03-01T12:00:00Z" and m["expires"] == "2026-03-31T12:00:00Z"
    assert {f["kind"] for f in m["files"]} == {"tile", "engine"}


def test_tiles_aggregate_hash_is_order_free_and_tile_only():
    files = _files()
    h = mf.tiles_aggregate_hash(files)
    assert h == mf.tiles_aggregate_hash(reversed(files))
    assert h == mf.tiles_aggregate_hash([f for f in files if f.kind == "tile"])
    changed = [FileEntry(f.path, f.size, "44" * 32, f.kind) for f in files]
    assert mf.tiles_aggregate_hash(changed) != h


@pytest.mark.parametrize("over, match", [
    ({"version": 0}, "version"),
    ({"issued_at": datetime(2026, 3, 1)}, "timezone"),
    ({"expires": T0}, "expire"),
    ({"files": _files() + [FileEntry("tiles/18/1/2.jpg", 1, H, "tile")]}, "twice"),
    ({"files": [FileEntry("../etc/passwd", 1, H, "tile")], "engines": []}, "'..'"),
    ({"files": [FileEntry("/etc/passwd", 1, H, "tile")], "engines": []}, "absolute"),
    ({"files": [FileEntry("a//b", 1, H, "tile")], "engines": []}, "normalized"),
    ({"files": [FileEntry("c10.toml", 1, H, "report")], "engines": []}, "control"),
    ({"engines": [{"path": "engines/other.onnx", "backend": "x"}]}, "engine entry"),
])
def test_build_manifest_refuses_what_the_verifier_would(over, match):
    with pytest.raises(ManifestWriteError, match=match):
        _manifest(**over)


def test_loads_checks_schema_version_and_structure():
    m = _manifest()
    m["schema_version"] = 99
    with pytest.raises(VerifyError) as info:
        loads_manifest(dumps_manifest(m))
    assert info.value.reason == "schema-version"
    for bad in (b"not json", b"[]", b'{"schema_version":1}', "\xff".encode("latin-1")):
        with pytest.raises(VerifyError) as info:
            loads_manifest(bad)
        assert info.value.reason == "bad-manifest"


@pytest.mark.parametrize("rel, expected", [
    ("dodo.py", True), ("c10.toml", True), (".c10.lock", True), ("Manifest.json", True),
    ("Manifest.json.dsse", True), (".c10/deps.db", True), (".c10/logs/a.log", True),
    ("doit.cfg", True), ("__pycache__/dodo.cpython-311.pyc", False),
    ("__pycache__/other.cpython-311.pyc", False),
    ("tiles/__pycache__/dodo.cpython-311.pyc", False), ("tiles/dodo.py", False),
    (".c10", False), (".hidden", False), ("Manifest.json.bak", False),
])
def test_is_control(rel, expected):
    assert is_control(rel) is expected


# ---------------------------------------------------------------- key allowlist

def test_check_key_allowed():
    key = Ed25519PrivateKey.generate()
    for allowed in (None, [], [keyid(key)], [keyid(key).upper()], [ssh_fingerprint(key)]):
        check_key_allowed(key, allowed)


def test_key_not_in_allowlist_fails_before_any_write(tmp_path):
    """Seed CP-TC-7: the caller checks first, so a refused key writes ZERO files."""
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    with pytest.raises(ManifestWriteError) as info:
        check_key_allowed(key, [keyid(other)])
        mf.write_signed_manifest(tmp_path, dumps_manifest(_manifest()), key)
    msg = str(info.value)
    assert keyid(key) in msg and ssh_fingerprint(key) in msg and "signing.allowed_keyids" in msg
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- write + versions

def test_write_signed_manifest_pair(tmp_path):
    key = Ed25519PrivateKey.generate()
    data = dumps_manifest(_manifest())
    mf.write_signed_manifest(tmp_path, data, key)
    assert (tmp_path / "Manifest.json").read_bytes() == data
    env = json.loads((tmp_path / "Manifest.json.dsse").read_bytes())
    assert base64.b64decode(env["payload"]) == data
    assert env["payloadType"] == "application/vnd.c10.manifest+json"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".c10", "Manifest.json",
                                                          "Manifest.json.dsse"]
    assert not list((tmp_path / ".c10").rglob("*.*"))  # temp files staged there, all renamed


def test_write_refuses_unparsable_bytes(tmp_path):
    with pytest.raises(ManifestWriteError, match="verifier would reject"):
        mf.write_signed_manifest(tmp_path, b"{}", Ed25519PrivateKey.generate())
    assert list(tmp_path.iterdir()) == []


def test_kill_between_the_two_writes_is_rejected_and_never_reuses_a_version(tmp_path,
                                                                            monkeypatch):
    key = Ed25519PrivateKey.generate()
    mf.write_signed_manifest(tmp_path, dumps_manifest(_manifest(version=1, files=[],
                                                                engines=[])), key)
    written, real = [], os.replace

    def killed_after_first(src, dst):
        if written:
            raise KeyboardInterrupt("killed")  # stands in for SIGKILL between the renames
        written.append(os.path.basename(dst))
        real(src, dst)

    monkeypatch.setattr(os, "replace", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        mf.write_signed_manifest(tmp_path, dumps_manifest(_manifest(version=2, files=[],
                                                                    engines=[])), key)
    monkeypatch.setattr(os, "replace", real)
    assert written == ["Manifest.json.dsse"]
    assert not list((tmp_path / ".c10").rglob("*.*"))  # the staged Manifest.json temp went too
    with pytest.raises(VerifyError) as info:
        verify_cache(tmp_path, trusted={keyid(key): key.public_key()}, now=T0, state_path=None)
    assert info.value.reason == "envelope-mismatch"
    assert mf.next_version(tmp_path) == 3  # version 2 was signed once: never sign it again


def test_next_version(tmp_path):
    assert mf.next_version(tmp_path) == 1
    mf.write_signed_manifest(tmp_path, dumps_manifest(_manifest(version=7)),
                             Ed25519PrivateKey.generate())
    assert mf.next_version(tmp_path) == 8


@pytest.mark.parametrize("name", ["Manifest.json", "Manifest.json.dsse"])
def test_next_version_refuses_unreadable_previous(tmp_path, name):
    mf.write_signed_manifest(tmp_path, dumps_manifest(_manifest(version=3)),
                             Ed25519PrivateKey.generate())
    (tmp_path / name).write_bytes(b"{garbage")
    with pytest.raises(ManifestWriteError, match="doit build_cache") as info:
        mf.next_version(tmp_path)
    assert name in str(info.value) and "rollback" in str(info.value)


def test_commit_check_compares_the_whole_payload(tmp_path):
    """CP-INV-1: a commit is intact only when Manifest.json is the signed payload byte for byte: a
    torn commit (older tail), one byte changed in the middle, or the same JSON re-ordered all
    differ; a missing Manifest.json is not intact."""
    import json

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from c10.trust.dsse import PAYLOAD_TYPE, sign_envelope
    from c10.trust.manifest import committed_intact

    payload = json.dumps({"files": ["x" * 5000], "version": 7}, sort_keys=True).encode()
    envelope = sign_envelope(payload, PAYLOAD_TYPE, Ed25519PrivateKey.generate())
    (tmp_path / "Manifest.json.dsse").write_text(json.dumps(envelope, sort_keys=True,
                                                            separators=(",", ":")))
    (tmp_path / "Manifest.json").write_bytes(payload)
    assert committed_intact(tmp_path)
    for edited in (payload.replace(b'"version": 7', b'"version": 6'),
                   payload.replace(b"x" * 10, b"x" * 9 + b"y", 1),
                   json.dumps({"version": 7, "files": ["x" * 5000]}).encode()):
        (tmp_path / "Manifest.json").write_bytes(edited)
        assert not committed_intact(tmp_path)
    (tmp_path / "Manifest.json").unlink()
    assert not committed_intact(tmp_path)


def test_the_commit_memo_spares_a_read_and_misses_no_edit(tmp_path, monkeypatch):
    """CP-INV-1 at no-op speed: once a pair was found intact and saved, the same pair (same
    inode, size, mtime, ctime) is intact without a read; an edit in place that puts back the size
    and the mtime (os.utime) still moves the ctime and is caught; a memo under another host's
    secret, or no secret, is never trusted."""
    import json
    import os

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from c10.trust import manifest as mf
    from c10.trust.dsse import PAYLOAD_TYPE, sign_envelope

    payload = json.dumps({"files": ["x" * 500], "version": 3}, sort_keys=True).encode()
    envelope = sign_envelope(payload, PAYLOAD_TYPE, Ed25519PrivateKey.generate())
    (tmp_path / "Manifest.json.dsse").write_text(json.dumps(envelope, sort_keys=True,
                                                            separators=(",", ":")))
    (tmp_path / "Manifest.json").write_bytes(payload)
    (tmp_path / ".c10").mkdir()
    secret, other = b"s" * 32, b"o" * 32
    assert mf.committed_intact(tmp_path, secret)  # read, not recorded
    assert not mf.remembered_intact(tmp_path, secret)
    assert mf.record_intact(tmp_path, secret) is None
    assert mf.remembered_intact(tmp_path, secret) and not mf.remembered_intact(tmp_path, other)
    reads = []
    real = mf._pair_intact
    monkeypatch.setattr(mf, "_pair_intact", lambda root: reads.append(root) or real(root))
    assert mf.committed_intact(tmp_path, secret) and reads == []
    assert mf.committed_intact(tmp_path, other) and len(reads) == 1  # another host reads
    assert mf.committed_intact(tmp_path) and len(reads) == 2         # so does no secret
    st = os.stat(tmp_path / "Manifest.json")
    with open(tmp_path / "Manifest.json", "r+b") as f:  # same size, one byte changed
        f.seek(20)
        f.write(b"y")
    os.utime(tmp_path / "Manifest.json", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(tmp_path / "Manifest.json").st_mtime_ns == st.st_mtime_ns
    assert not mf.committed_intact(tmp_path, secret) and len(reads) == 3
