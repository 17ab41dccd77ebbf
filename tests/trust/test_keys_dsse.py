"""Operator keys and DSSE envelopes: real Ed25519, real files."""
from __future__ import annotations

import base64
import builtins
import hashlib
import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from c10.errors import SigningKeyError, TrustedKeyError, VerifyError
from c10.trust.dsse import PAYLOAD_TYPE, pae, sign_envelope, verify_envelope
from c10.trust.keys import (
    generate_key,
    keyid,
    load_signing_key,
    load_trusted_keys,
    public_key_pem,
    ssh_fingerprint,
)


@pytest.fixture
def keyfile(tmp_path):
    path = tmp_path / "keys" / "op.pem"
    path.parent.mkdir()
    kid = generate_key(path)
    return path, kid


def _load(path, passphrase=None, cache_root=None):
    return load_signing_key(path, passphrase=passphrase, cache_root=cache_root)


# ---------------------------------------------------------------- generate

def test_generate_key_is_0600_and_returns_its_keyid(keyfile):
    path, kid = keyfile
    assert path.stat().st_mode & 0o777 == 0o600
    assert keyid(_load(path)) == kid
    assert b"BEGIN PRIVATE KEY" in path.read_bytes()


def test_generate_key_never_world_readable_even_with_umask_0(tmp_path, monkeypatch):
    modes = []
    real_link = os.link

    def probe(src, dst, *a, **kw):  # the moment the key becomes visible under its name
        modes.append(os.stat(src).st_mode & 0o777)
        return real_link(src, dst, *a, **kw)

    monkeypatch.setattr(os, "link", probe)
    old = os.umask(0)
    try:
        generate_key(tmp_path / "k.pem")
    finally:
        os.umask(old)
    assert modes == [0o600]
    assert (tmp_path / "k.pem").stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["k.pem"]  # no temp file left behind


def test_generate_key_refuses_to_overwrite(keyfile):
    path, _ = keyfile
    before = path.read_bytes()
    with pytest.raises(SigningKeyError, match="refusing to overwrite"):
        generate_key(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["op.pem"]


def test_generate_key_missing_directory(tmp_path):
    with pytest.raises(SigningKeyError, match="mkdir -p"):
        generate_key(tmp_path / "nope" / "k.pem")


def test_encrypted_key_roundtrip_and_passphrase_errors(tmp_path):
    path = tmp_path / "enc.pem"
    kid = generate_key(path, passphrase=b"correct horse")
    assert b"ENCRYPTED" in path.read_bytes()
    assert keyid(_load(path, b"correct horse")) == kid
    with pytest.raises(SigningKeyError, match="wrong passphrase"):
        _load(path, b"wrong")
    with pytest.raises(SigningKeyError, match="no passphrase was given"):
        _load(path, None)


def test_passphrase_for_plain_key_is_an_error(keyfile):
    with pytest.raises(SigningKeyError, match="not encrypted"):
        _load(keyfile[0], b"x")


# ---------------------------------------------------------------- load refusals

@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_load_refuses_group_or_world_readable(keyfile, mode):
    path, _ = keyfile
    path.chmod(mode)
    with pytest.raises(SigningKeyError, match=f"chmod 600 {path}"):
        _load(path)


def test_load_refuses_symlink(keyfile):
    path, _ = keyfile
    link = path.parent / "link.pem"
    link.symlink_to(path)
    with pytest.raises(SigningKeyError, match="symlink"):
        _load(link)


def test_load_refuses_key_inside_cache(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    generate_key(cache / "op.pem")
    with pytest.raises(SigningKeyError, match="inside the cache"):
        _load(cache / "op.pem", cache_root=cache)
    alias = tmp_path / "alias"  # the same cache reached through a symlink
    alias.symlink_to(cache)
    with pytest.raises(SigningKeyError, match="inside the cache"):
        _load(cache / "op.pem", cache_root=alias)


def test_load_outside_cache_is_fine(keyfile, tmp_path):
    (tmp_path / "cache").mkdir()
    assert keyid(_load(keyfile[0], cache_root=tmp_path / "cache")) == keyfile[1]


def test_load_missing_file_says_keygen(tmp_path):
    with pytest.raises(SigningKeyError, match="c10 keygen"):
        _load(tmp_path / "absent.pem")


def test_load_refuses_directory_and_garbage(tmp_path):
    (tmp_path / "d").mkdir(mode=0o700)
    with pytest.raises(SigningKeyError):
        _load(tmp_path / "d")
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"not a key")
    junk.chmod(0o600)
    with pytest.raises(SigningKeyError, match="not a valid PEM"):
        _load(junk)


def test_load_refuses_non_ed25519(tmp_path):
    path = tmp_path / "ec.pem"
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.write_bytes(pem)
    path.chmod(0o600)
    with pytest.raises(SigningKeyError, match="not Ed25519"):
        _load(path)


def test_key_file_opened_exactly_once_and_bytes_zeroed(keyfile, monkeypatch):
    path, kid = keyfile
    opens, parsed = [], []

    def counting(real):
        def wrapper(file, *a, **kw):
            if isinstance(file, (str, os.PathLike)) and Path(file).resolve() == path.resolve():
                opens.append(real.__name__)
            return real(file, *a, **kw)
        wrapper.__name__ = real.__name__
        return wrapper

    real_parse = serialization.load_pem_private_key

    def capture(data, *a, **kw):
        parsed.append(data)
        return real_parse(data, *a, **kw)

    monkeypatch.setattr(os, "open", counting(os.open))
    monkeypatch.setattr(builtins, "open", counting(builtins.open))
    monkeypatch.setattr(io, "open", counting(io.open))
    monkeypatch.setattr(serialization, "load_pem_private_key", capture)
    key = _load(path)
    assert keyid(key) == kid
    assert len(opens) == 1
    assert isinstance(parsed[0], bytearray) and not any(parsed[0])  # zeroed after parsing


# ---------------------------------------------------------------- identity

def test_keyid_is_sha256_of_raw_public_key():
    key = Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert keyid(key) == keyid(key.public_key()) == hashlib.sha256(raw).hexdigest()


def test_ssh_fingerprint_matches_openssh(tmp_path):
    key = Ed25519PrivateKey.generate()
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH)
    blob = base64.b64decode(line.split()[1])
    expected = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    assert ssh_fingerprint(key) == expected
    if shutil.which("ssh-keygen"):
        (tmp_path / "k.pub").write_bytes(line + b"\n")
        out = subprocess.run(["ssh-keygen", "-lf", str(tmp_path / "k.pub")], check=True,
                             capture_output=True, text=True).stdout
        assert out.split()[1] == ssh_fingerprint(key)


def test_load_trusted_keys_pem_hex_and_ssh(tmp_path):
    keys = [Ed25519PrivateKey.generate() for _ in range(3)]
    (tmp_path / "a.pub").write_bytes(public_key_pem(keys[0]))
    raw_hex = keys[1].public_key().public_bytes(serialization.Encoding.Raw,
                                                serialization.PublicFormat.Raw).hex()
    (tmp_path / "c.pub").write_bytes(keys[2].public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    trusted = load_trusted_keys([tmp_path / "a.pub", raw_hex, str(tmp_path / "c.pub")])
    assert set(trusted) == {keyid(k) for k in keys}


def test_load_trusted_keys_rejects_garbage(tmp_path):
    (tmp_path / "bad.pub").write_bytes(b"hello")
    with pytest.raises(TrustedKeyError, match="not an Ed25519 public key"):
        load_trusted_keys([tmp_path / "bad.pub"])
    with pytest.raises(TrustedKeyError, match="cannot read trusted key"):
        load_trusted_keys([tmp_path / "absent.pub"])


# ---------------------------------------------------------------- DSSE

def test_pae_matches_dsse_spec_vector():
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world")
    assert pae("t", b"") == b"DSSEv1 1 t 0 "


def _env(payload=b'{"a":1}', key=None):
    key = key or Ed25519PrivateKey.generate()
    return sign_envelope(payload, PAYLOAD_TYPE, key), key


def test_sign_and_verify_roundtrip():
    env, key = _env()
    assert set(env) == {"payloadType", "payload", "signatures"}
    assert env["signatures"][0]["keyid"] == keyid(key)
    assert verify_envelope(env, {keyid(key): key.public_key()}) == b'{"a":1}'


def test_verify_accepts_urlsafe_base64():
    env, key = _env(payload=b"\xfb\xff" * 10)
    env["payload"] = base64.urlsafe_b64encode(b"\xfb\xff" * 10).decode().rstrip("=")
    assert verify_envelope(env, {keyid(key): key.public_key()}) == b"\xfb\xff" * 10


def _reason(env, trusted, threshold=1):
    with pytest.raises(VerifyError) as info:
        verify_envelope(env, trusted, threshold)
    return info.value.reason


def test_unknown_keyids_are_ignored_when_a_trusted_one_verifies():
    env, key = _env()
    stranger, _ = _env()
    env["signatures"].insert(0, stranger["signatures"][0])
    assert verify_envelope(env, {keyid(key): key.public_key()}) == b'{"a":1}'


def test_only_unknown_keys_is_unknown_key():
    env, _ = _env()
    other = Ed25519PrivateKey.generate()
    assert _reason(env, {keyid(other): other.public_key()}) == "unknown-key"


def test_duplicated_signature_counts_once():
    env, key = _env()
    env["signatures"].append(dict(env["signatures"][0]))
    trusted = {keyid(key): key.public_key()}
    assert _reason(env, trusted, threshold=2) == "threshold"
    assert verify_envelope(env, trusted, threshold=1)


def test_two_distinct_keys_meet_threshold_two():
    env, key_a = _env()
    key_b = Ed25519PrivateKey.generate()
    env["signatures"] += sign_envelope(b'{"a":1}', PAYLOAD_TYPE, key_b)["signatures"]
    trusted = {keyid(k): k.public_key() for k in (key_a, key_b)}
    assert verify_envelope(env, trusted, threshold=2) == b'{"a":1}'


def test_edited_payload_is_bad_signature():
    env, key = _env()
    env["payload"] = base64.b64encode(b'{"a":2}').decode()
    assert _reason(env, {keyid(key): key.public_key()}) == "bad-signature"


def test_edited_payload_type_is_rejected():
    env, key = _env()
    env["payloadType"] = "application/json"
    assert _reason(env, {keyid(key): key.public_key()}) == "bad-payload-type"


def test_signature_over_other_payload_type_is_rejected():
    key = Ed25519PrivateKey.generate()
    env = sign_envelope(b"{}", "application/vnd.in-toto+json", key)
    assert _reason(env, {keyid(key): key.public_key()}) == "bad-payload-type"


@pytest.mark.parametrize("env", [
    [], {}, {"payloadType": PAYLOAD_TYPE, "payload": "e30=", "signatures": []},
    {"payloadType": PAYLOAD_TYPE, "payload": "!!", "signatures": [{"keyid": "", "sig": "AA=="}]},
    {"payloadType": PAYLOAD_TYPE, "payload": "e30=", "signatures": [{"keyid": 3, "sig": "AA=="}]},
    {"payloadType": PAYLOAD_TYPE, "payload": "e30=", "signatures": ["x"]},
])
def test_malformed_envelopes(env):
    key = Ed25519PrivateKey.generate()
    assert _reason(env, {keyid(key): key.public_key()}) == "bad-envelope"


def test_prompt_is_asked_only_for_an_encrypted_key(tmp_path):
    from c10.trust.keys import generate_key, load_signing_key

    asked = []
    generate_key(tmp_path / "enc.pem", b"secret")
    generate_key(tmp_path / "plain.pem")
    load_signing_key(tmp_path / "enc.pem", passphrase=lambda: asked.append("enc") or b"secret",
                     cache_root=None)
    load_signing_key(tmp_path / "plain.pem", passphrase=lambda: asked.append("plain") or b"x",
                     cache_root=None)
    assert asked == ["enc"]
