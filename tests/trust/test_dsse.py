"""The DSSE envelope from the attacker's side: one who can write the cache directory but holds no
key. Each test names the VerifyError reason the aircraft must see; real Ed25519 keys, a real signed
cache (test_verify.Cache) wherever the file on disk matters.

Decision on unattributable signatures (DSSE protocol.md, "Multi-signature Verification": a
signature that fails is skipped; KEYID is an unauthenticated hint): a signature with no keyid or
an unknown one counts when it verifies under a trusted key and is skipped when it verifies under
none, since it cannot be told from a co-signer's. A signature whose keyid names a trusted key and
fails rejects the envelope (bad-signature), whatever else verifies.
"""
from __future__ import annotations

import base64
import json
import os
import time
import tracemalloc

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_verify import Cache  # the hand-built signed cache of the verifier's tests

from c10.canonical import canonical_json
from c10.errors import VerifyError
from c10.trust.dsse import (
    MAX_SIGNATURES,
    PAYLOAD_TYPE,
    envelope_size_limit,
    pae,
    parse_envelope,
    sign_envelope,
    verify_envelope,
    verify_envelope_signers,
)
from c10.trust.keys import keyid
from c10.trust.verify import EXIT_CODES

ENV = "Manifest.json.dsse"
MB = 1 << 20


@pytest.fixture
def cache(tmp_path):
    """A signed cache whose Manifest.json is 1 mod 3 bytes long: its base64 ends in "==", so the
    unused bits of the last character and the padding can both be attacked."""
    (tmp_path / "cache").mkdir()
    c = Cache(tmp_path / "cache", tmp_path / "keys")
    for extra in range(3):
        if len(_payload(c)) % 3 == 1:
            return c
        c.sign(c.manifest(build_identity="build-A" + "x" * (extra + 1)))
    raise AssertionError("no padding length found")


def _payload(cache) -> bytes:
    return (cache.root / "Manifest.json").read_bytes()


def _envelope(cache) -> dict:
    return json.loads((cache.root / ENV).read_bytes())


def _write(cache, envelope: dict | bytes) -> None:
    data = envelope if isinstance(envelope, bytes) else json.dumps(envelope).encode()
    (cache.root / ENV).write_bytes(data)


def _sig(cache, key: Ed25519PrivateKey | None = None) -> str:
    """A real signature over this cache's Manifest.json, standard base64."""
    return base64.b64encode((key or cache.key).sign(pae(PAYLOAD_TYPE, _payload(cache)))).decode()


def _garbage_sig() -> str:
    return base64.b64encode(os.urandom(64)).decode()


def _verdict(cache, **kw) -> str:
    """verify_cache's reason, with its exit code and a message any terminal prints."""
    with pytest.raises(VerifyError) as info:
        cache.verify(**kw)
    assert info.value.exit_code == EXIT_CODES[info.value.reason]
    str(info.value).encode("ascii")
    return info.value.reason


def _reason(call, *args, **kw) -> str:
    with pytest.raises(VerifyError) as info:
        call(*args, **kw)
    str(info.value).encode("ascii")  # every message prints on any terminal
    assert info.value.reason in EXIT_CODES
    return info.value.reason


# ---------------------------------------------------------------- base64: strict, either alphabet

def _flip_unused_bits(text: str) -> str:
    """Same bytes to a lenient decoder, but not canonical: set an unused bit before the padding."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    body = text.rstrip("=")
    return body[:-1] + alphabet[alphabet.index(body[-1]) | 1] + text[len(body):]


def _urlsafe(text: str) -> str:
    return text.replace("+", "-").replace("/", "_")


PAYLOAD_ATTACKS = {
    "garbage-after-padding": lambda p: p + "AAAA",
    "urlsafe-garbage-after-padding": lambda p: _urlsafe(p) + "_junk-",
    "third-padding-char": lambda p: p + "=",
    "padding-inside": lambda p: p[:8] + "==" + p[8:],
    "junk-inside": lambda p: p[:40] + "!" + p[40:],
    "urlsafe-junk-inside": lambda p: _urlsafe(p)[:40] + "!_" + _urlsafe(p)[40:],
    "space-inside": lambda p: p[:40] + " " + p[40:],
    "mime-line-breaks": lambda p: "\n".join(p[i:i + 76] for i in range(0, len(p), 76)),
    "trailing-newline": lambda p: p + "\n",
    "non-canonical-unused-bits": _flip_unused_bits,
    "non-ascii": lambda p: p[:40] + "\u0391" + p[40:],
}


@pytest.mark.parametrize("attack", sorted(PAYLOAD_ATTACKS))
def test_payload_that_is_not_strict_base64_is_bad_envelope(cache, attack):
    env = _envelope(cache)
    assert env["payload"].endswith("==")  # the fixture's promise
    env["payload"] = PAYLOAD_ATTACKS[attack](env["payload"])
    _write(cache, env)
    assert _verdict(cache) == "bad-envelope"


@pytest.mark.parametrize("attack", ["garbage-after-padding", "urlsafe-garbage-after-padding",
                                    "junk-inside", "trailing-newline", "non-canonical-unused-bits"])
def test_signature_that_is_not_strict_base64_is_bad_envelope(cache, attack):
    env = _envelope(cache)
    env["signatures"][0]["sig"] = PAYLOAD_ATTACKS[attack](env["signatures"][0]["sig"])
    _write(cache, env)
    assert _verdict(cache) == "bad-envelope"


def test_mixed_alphabets_are_bad_envelope():
    key = Ed25519PrivateKey.generate()
    payload = b"\xfb\xff\xbf" * 4  # standard "+/+/...", URL-safe "-_-_..."
    env = sign_envelope(payload, PAYLOAD_TYPE, key)
    assert "+" in env["payload"] and "/" in env["payload"]
    env["payload"] = "-" + env["payload"][1:]  # one URL-safe character among standard ones
    assert _reason(verify_envelope, env, {keyid(key): key.public_key()}) == "bad-envelope"


@pytest.mark.parametrize("form", ["standard-unpadded", "urlsafe-padded", "urlsafe-unpadded"])
def test_either_alphabet_with_or_without_padding_verifies(cache, form):
    """envelope.md and protocol.md: standard or URL-safe, verifiers MUST accept either."""
    env = _envelope(cache)
    for entry, field in ((env, "payload"), (env["signatures"][0], "sig")):
        text = entry[field]
        text = _urlsafe(text) if form.startswith("urlsafe") else text
        entry[field] = text.rstrip("=") if form.endswith("unpadded") else text
    _write(cache, env)
    assert cache.verify().keyid == keyid(cache.key)


@pytest.mark.parametrize("size", [0, 63, 65, 128])
def test_signature_not_64_bytes_is_bad_envelope(cache, size):
    env = _envelope(cache)
    env["signatures"][0]["sig"] = base64.b64encode(os.urandom(size)).decode()
    _write(cache, env)
    assert _verdict(cache) == "bad-envelope"


# ---------------------------------------------------------------- JSON: strict

def _raw_envelope(cache) -> bytes:
    return (cache.root / ENV).read_bytes()


def test_duplicate_payload_key_is_bad_envelope(cache):
    """A lenient parser keeps the last `payload`; another reader may keep the first."""
    other = base64.b64encode(b'{"version": 999}').decode()
    raw = _raw_envelope(cache)
    assert raw.startswith(b'{"payload":')
    _write(cache, b'{"payload":"' + other.encode() + b'",' + raw[1:])
    assert _verdict(cache) == "bad-envelope"


def test_duplicate_key_inside_a_signature_is_bad_envelope(cache):
    raw = _raw_envelope(cache)
    good = _envelope(cache)["signatures"][0]["sig"]
    _write(cache, raw.replace(b'"sig":"', b'"sig":"' + _garbage_sig().encode() + b'","sig":"'))
    assert good.encode() in (cache.root / ENV).read_bytes()
    assert _verdict(cache) == "bad-envelope"


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_bad_envelope(cache, constant):
    raw = _raw_envelope(cache).rstrip()
    _write(cache, raw[:-1] + b',"n":' + constant.encode() + b"}")
    with pytest.raises(VerifyError, match=f"{constant} is not JSON") as info:
        cache.verify()
    assert info.value.reason == "bad-envelope"


@pytest.mark.parametrize("data", [b"\xff\xfe{}", b"\xef\xbb\xbf{}", b"", b"null", b"[]", b'"x"'])
def test_not_an_envelope_object_is_bad_envelope(cache, data):
    _write(cache, data)
    assert _verdict(cache) == "bad-envelope"


@pytest.mark.parametrize("opener,closer", [("[", "]"), ('{"a":', "}")])
def test_nesting_100000_deep_is_a_verdict_not_a_traceback(cache, opener, closer):
    deep = (opener * 100_000 + closer * 100_000).encode()
    # by the parser itself, with room to read it all ...
    assert _reason(parse_envelope, deep, 10 * MB) == "bad-envelope"
    inside = b'{"payload":"","payloadType":"x","signatures":' + deep + b"}"
    assert _reason(parse_envelope, inside, 10 * MB) == "bad-envelope"
    # ... and through the verifier, whose size cap stops it first
    _write(cache, inside)
    assert _verdict(cache) == "bad-envelope"


def test_nesting_deep_but_under_the_size_cap_is_bad_envelope(cache):
    depth = 30_000  # 60 KB of brackets: under the cap, so the JSON parser meets them
    raw = _raw_envelope(cache).rstrip()
    _write(cache, raw[:-1] + b',"n":' + b"[" * depth + b"]" * depth + b"}")
    assert (cache.root / ENV).stat().st_size < envelope_size_limit(len(_payload(cache)))
    assert _verdict(cache) == "bad-envelope"


def test_payload_type_with_a_lone_surrogate_is_a_printable_bad_payload_type(cache):
    raw = _raw_envelope(cache).replace(PAYLOAD_TYPE.encode(), b"\\ud800" + b"x" * 10_000)
    _write(cache, raw)
    assert _verdict(cache) == "bad-payload-type"
    key = cache.key
    assert _reason(verify_envelope, json.loads(raw), {keyid(key): key.public_key()}) == \
        "bad-payload-type"


# ---------------------------------------------------------------- fields: exactly DSSE's

@pytest.mark.parametrize("where", ["top", "signature"])
def test_unknown_field_is_bad_envelope(cache, where):
    env = _envelope(cache)
    (env if where == "top" else env["signatures"][0])["comment"] = "hi"
    _write(cache, env)
    assert _verdict(cache) == "bad-envelope"


@pytest.mark.parametrize("drop", ["payload", "payloadType", "signatures"])
def test_missing_field_is_bad_envelope(cache, drop):
    env = _envelope(cache)
    del env[drop]
    _write(cache, env)
    assert _verdict(cache) == "bad-envelope"


@pytest.mark.parametrize("edit", [
    lambda e: e.update(payload=123), lambda e: e.update(payload=None),
    lambda e: e.update(payloadType=["x"]), lambda e: e.update(signatures={}),
    lambda e: e.update(signatures=[]), lambda e: e["signatures"].append("sig"),
    lambda e: e["signatures"][0].update(keyid=None), lambda e: e["signatures"][0].update(keyid=7),
    lambda e: e["signatures"][0].update(sig=1), lambda e: e["signatures"][0].pop("sig"),
])
def test_wrong_types_are_bad_envelope(cache, edit):
    env = _envelope(cache)
    edit(env)
    _write(cache, env)
    assert _verdict(cache) == "bad-envelope"


def test_50_mb_unknown_field_is_refused_unread(cache):
    """The size cap (base64 of Manifest.json + 64 KiB): refused from fstat, never read or parsed."""
    raw = _raw_envelope(cache).rstrip()
    with open(cache.root / ENV, "wb") as fh:
        fh.write(raw[:-1] + b',"junk":"')
        fh.write(b"A" * (50 * MB))
        fh.write(b'"}')
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(VerifyError, match="more than the") as info:
            cache.verify()
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.reason == "bad-envelope"
    assert elapsed < 2.0 and peak < 2 * MB, (elapsed, peak)


def test_whitespace_padding_beyond_the_cap_is_bad_envelope(cache):
    """Valid JSON, valid signature, but bigger than any envelope of this Manifest.json."""
    limit = envelope_size_limit(len(_payload(cache)))
    _write(cache, _raw_envelope(cache) + b" " * limit)
    assert _verdict(cache) == "bad-envelope"


def test_the_cap_holds_every_honest_envelope():
    keys = [Ed25519PrivateKey.generate() for _ in range(MAX_SIGNATURES)]
    for size in (0, 1, 2, 3, 1000, 3 * MB + 1):
        payload = os.urandom(size)
        env = sign_envelope(payload, PAYLOAD_TYPE, keys[0])
        for k in keys[1:]:
            env["signatures"] += sign_envelope(payload, PAYLOAD_TYPE, k)["signatures"]
        pretty = json.dumps(env, indent=4).encode()  # securesystemslib users may indent
        assert len(pretty) <= envelope_size_limit(size)
        assert verify_envelope(parse_envelope(pretty, envelope_size_limit(size)),
                               {keyid(k): k.public_key() for k in keys}, MAX_SIGNATURES) == payload


# ---------------------------------------------------------------- how many signatures

def test_5000_unknown_signatures_are_bad_envelope(cache):
    env = _envelope(cache)
    env["signatures"] += [{"keyid": f"{i:064x}", "sig": _garbage_sig()} for i in range(4999)]
    start = time.perf_counter()
    _write(cache, env)
    assert _verdict(cache) == "bad-envelope"  # over the size cap
    raw = json.dumps(env).encode()
    with pytest.raises(VerifyError, match="5000 signatures") as info:
        parse_envelope(raw, len(raw))  # and over MAX_SIGNATURES, had it fitted
    assert info.value.reason == "bad-envelope"
    assert time.perf_counter() - start < 5.0


def test_one_more_than_max_signatures_is_bad_envelope(cache):
    env = _envelope(cache)
    env["signatures"] += [{"sig": _garbage_sig()} for _ in range(MAX_SIGNATURES)]
    _write(cache, env)
    assert _verdict(cache) == "bad-envelope"
    env["signatures"].pop()
    _write(cache, env)
    assert cache.verify().keyid == keyid(cache.key)  # exactly MAX_SIGNATURES is fine


# ---------------------------------------------------------------- keyid: a hint, never a pass

def test_garbage_second_signature_under_the_trusted_keyid_is_bad_signature(cache):
    env = _envelope(cache)
    env["signatures"].append({"keyid": keyid(cache.key), "sig": _garbage_sig()})
    _write(cache, env)
    assert _verdict(cache) == "bad-signature"
    env["signatures"].reverse()
    _write(cache, env)
    assert _verdict(cache) == "bad-signature"


def test_signature_of_another_manifest_under_the_trusted_keyid_is_bad_signature(cache):
    other = base64.b64encode(cache.key.sign(pae(PAYLOAD_TYPE, b"{}"))).decode()
    env = _envelope(cache)
    env["signatures"].append({"keyid": keyid(cache.key).upper(), "sig": other})
    _write(cache, env)
    assert _verdict(cache) == "bad-signature"


def test_valid_signature_under_another_trusted_keys_keyid_is_bad_signature(cache):
    """The keyid names trusted key B, so only B is tried, and B did not sign."""
    second = Ed25519PrivateKey.generate()
    trusted = {**cache.trusted, keyid(second): second.public_key()}
    _write(cache, {"payloadType": PAYLOAD_TYPE, "payload": _envelope(cache)["payload"],
                   "signatures": [{"keyid": keyid(second), "sig": _sig(cache)}]})
    assert _verdict(cache, trusted=trusted) == "bad-signature"


@pytest.mark.parametrize("hint", [None, "", "operator", "a" * 64, "\ud800", "x" * 10_000])
def test_valid_signature_with_missing_or_unknown_keyid_verifies(cache, hint):
    """DSSE: keyid is OPTIONAL (unset == empty) and only narrows the keys to try."""
    entry = {"sig": _sig(cache)} if hint is None else {"keyid": hint, "sig": _sig(cache)}
    _write(cache, {"payload": _envelope(cache)["payload"], "payloadType": PAYLOAD_TYPE,
                   "signatures": [entry]})
    assert cache.verify().keyid == keyid(cache.key)


@pytest.mark.parametrize("hint", [None, "", "stranger"])
def test_keyless_garbage_beside_a_valid_signature_is_skipped(cache, hint):
    """Attributable to no trusted key (it verifies under none): a co-signer's, for all we know."""
    garbage = {"sig": _garbage_sig()} if hint is None else {"keyid": hint, "sig": _garbage_sig()}
    env = _envelope(cache)
    env["signatures"].insert(0, garbage)
    _write(cache, env)
    assert cache.verify().keyid == keyid(cache.key)


@pytest.mark.parametrize("hint", [None, "stranger"])
def test_only_unattributable_garbage_is_unknown_key(cache, hint):
    garbage = {"sig": _garbage_sig()} if hint is None else {"keyid": hint, "sig": _garbage_sig()}
    env = _envelope(cache)
    env["signatures"] = [garbage]
    _write(cache, env)
    assert _verdict(cache) == "unknown-key"


def test_keyless_signature_over_an_edited_payload_is_refused(cache):
    env = _envelope(cache)
    body = json.loads(_payload(cache))
    body["version"] = 99
    edited = json.dumps(body).encode()
    env["payload"] = base64.b64encode(edited).decode()
    env["signatures"][0].pop("keyid")
    (cache.root / "Manifest.json").write_bytes(edited)
    _write(cache, env)
    assert _verdict(cache) == "unknown-key"


def test_one_key_named_and_keyless_counts_once(cache):
    env = _envelope(cache)
    env["signatures"].append({"sig": _sig(cache)})  # the same key again, without keyid
    _write(cache, env)
    assert _verdict(cache, threshold=2) == "threshold"
    assert cache.verify(threshold=1).keyid == keyid(cache.key)


def test_two_keys_one_of_them_keyless_meet_threshold_two(cache):
    second = Ed25519PrivateKey.generate()
    env = _envelope(cache)
    env["signatures"].append({"sig": _sig(cache, second)})
    _write(cache, env)
    trusted = {**cache.trusted, keyid(second): second.public_key()}
    result = cache.verify(trusted=trusted, threshold=2)
    assert result.keyid == ",".join(sorted([keyid(cache.key), keyid(second)]))


def test_verify_envelope_signers_reports_the_key_not_the_hint():
    key = Ed25519PrivateKey.generate()
    env = sign_envelope(b"{}", PAYLOAD_TYPE, key)
    env["signatures"][0]["keyid"] = "whatever"
    assert verify_envelope_signers(env, {keyid(key): key.public_key()}) == (b"{}", (keyid(key),))


# ---------------------------------------------------------------- other producers

def test_securesystemslib_shaped_envelope_verifies(cache):
    """Its shape: payload first, spaces after separators, its own keyid scheme."""
    env = {"payload": _envelope(cache)["payload"], "payloadType": PAYLOAD_TYPE,
           "signatures": [{"keyid": "f1e2d3" * 10 + "abcd", "sig": _sig(cache)}]}
    _write(cache, json.dumps(env, indent=1).encode())
    assert cache.verify().keyid == keyid(cache.key)


def test_securesystemslib_signs_with_the_operator_key_and_c10_verifies(cache):
    dsse = pytest.importorskip("securesystemslib.dsse")
    signer = pytest.importorskip("securesystemslib.signer")
    envelope = dsse.Envelope(_payload(cache), PAYLOAD_TYPE, {})
    sig = envelope.sign(signer.CryptoSigner(cache.key))  # the key load_signing_key returned
    assert sig.keyid != keyid(cache.key)  # securesystemslib's keyid scheme differs from c10's
    _write(cache, json.dumps(envelope.to_dict()).encode())
    assert cache.verify().keyid == keyid(cache.key)
    # and the other way: securesystemslib verifies what c10 signed, given c10's keyid
    ours = dsse.Envelope.from_dict(json.loads(canonical_json(
        sign_envelope(_payload(cache), PAYLOAD_TYPE, cache.key))))
    public = signer.SSlibKey.from_crypto(cache.key.public_key(), keyid=keyid(cache.key))
    assert keyid(cache.key) in ours.verify([public], 1)


# ---------------------------------------------------------------- the files themselves

def test_envelope_symlink_and_fifo(cache, tmp_path):
    (tmp_path / "real.dsse").write_bytes(_raw_envelope(cache))
    (cache.root / ENV).unlink()
    (cache.root / ENV).symlink_to(tmp_path / "real.dsse")
    assert _verdict(cache) == "symlink"
    (cache.root / ENV).unlink()
    os.mkfifo(cache.root / ENV)
    assert _verdict(cache) == "special-file"


def test_manifest_symlink_and_fifo_are_caught_before_the_envelope_is_read(cache, tmp_path):
    (tmp_path / "real.json").write_bytes(_payload(cache))
    (cache.root / "Manifest.json").unlink()
    (cache.root / "Manifest.json").symlink_to(tmp_path / "real.json")
    assert _verdict(cache) == "symlink"
    (cache.root / "Manifest.json").unlink()
    os.mkfifo(cache.root / "Manifest.json")
    assert _verdict(cache) == "special-file"


def test_planted_keyless_signatures_cost_no_verify_beside_a_valid_named_one(cache, monkeypatch):
    import c10.trust.dsse as dsse

    calls = []
    real = dsse._sig_ok
    monkeypatch.setattr(dsse, "_sig_ok", lambda *a: calls.append(1) or real(*a))
    env = _envelope(cache)
    env["signatures"] = [{"sig": _garbage_sig()} for _ in range(MAX_SIGNATURES - 1)] + \
        env["signatures"]
    trusted = {**cache.trusted}
    for _ in range(5):
        other = Ed25519PrivateKey.generate()
        trusted[keyid(other)] = other.public_key()
    assert verify_envelope(env, trusted) == _payload(cache)
    assert len(calls) == 1
