"""DSSE envelopes (Ed25519 over PAE) of the Manifest: sign, parse, verify."""
from __future__ import annotations

import base64
import binascii
import hashlib

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from c10.errors import VerifyError
from c10.trust.keys import keyid, raw_public

PAYLOAD_TYPE = "application/vnd.c10.manifest+json"


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 Pre-Authentication Encoding: what is actually signed."""
    ptype = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(ptype), ptype, len(payload), payload)


def sign_envelope(payload: bytes, payload_type: str, key: Ed25519PrivateKey) -> dict:
    """A one-signature DSSE envelope (standard base64, keyid = hex sha256 of raw public key)."""
    sig = key.sign(pae(payload_type, payload))
    return {
        "payloadType": payload_type,
        "payload": base64.b64encode(payload).decode("ascii"),
        "signatures": [{"keyid": keyid(key), "sig": base64.b64encode(sig).decode("ascii")}],
    }


def verify_envelope(
    envelope: dict, trusted: dict[str, Ed25519PublicKey], threshold: int = 1
) -> bytes:
    """Return the payload when >= `threshold` DISTINCT trusted keys signed it; else VerifyError.

    Signatures with unknown keyids are skipped (other signers may co-sign); a repeated
    signature of one key counts once, so one key can never satisfy threshold 2.
    """
    return verify_envelope_signers(envelope, trusted, threshold)[0]


def verify_envelope_signers(
    envelope: dict, trusted: dict[str, Ed25519PublicKey], threshold: int = 1
) -> tuple[bytes, tuple[str, ...]]:
    """verify_envelope, also returning the sorted keyids whose signatures verified."""
    payload_type, payload, sigs = _envelope_parts(envelope)
    if payload_type != PAYLOAD_TYPE:
        raise VerifyError("bad-payload-type", f"envelope payloadType is {payload_type!r}, "
                          f"expected {PAYLOAD_TYPE!r}; rebuild with `doit build_cache`")
    signed = pae(payload_type, payload)
    good, bad = set(), 0
    for kid, sig in sigs:
        key = trusted.get(kid)
        if key is None:
            continue
        if _sig_ok(key, sig, signed):
            good.add(raw_public(key))
        else:
            bad += 1
    _check_threshold(len(good), bad, max(threshold, 1), trusted)
    return payload, tuple(sorted(hashlib.sha256(raw).hexdigest() for raw in good))


def _sig_ok(key: Ed25519PublicKey, sig: bytes, message: bytes) -> bool:
    try:
        key.verify(sig, message)
    except InvalidSignature:
        return False
    return True


def _check_threshold(good: int, bad: int, threshold: int, trusted: dict) -> None:
    if good >= threshold:
        return
    if good == 0 and bad == 0:
        raise VerifyError("unknown-key", f"no signature is by a trusted key (trusted keyids: "
                          f"{', '.join(sorted(trusted)) or 'none'}); pass the operator's public "
                          f"key with --trusted-keys FILE", "Manifest.json.dsse")
    reason = "bad-signature" if bad else "threshold"
    raise VerifyError(reason, f"{good} distinct trusted key(s) verified, {threshold} required, "
                      f"{bad} signature(s) by trusted keys invalid; the Manifest or envelope was "
                      f"altered or under-signed: re-sign with `doit build_cache`",
                      "Manifest.json.dsse")


def _envelope_parts(envelope: object) -> tuple[str, bytes, list[tuple[str, bytes]]]:
    if not isinstance(envelope, dict):
        raise _bad_envelope("not a JSON object")
    ptype, payload, sigs = (envelope.get(k) for k in ("payloadType", "payload", "signatures"))
    if not isinstance(ptype, str) or not isinstance(payload, str):
        raise _bad_envelope("payloadType and payload must be strings")
    if not isinstance(sigs, list) or not sigs:
        raise _bad_envelope("signatures must be a non-empty list")
    return ptype, _b64(payload, "payload"), [_sig_entry(s) for s in sigs]


def _sig_entry(entry: object) -> tuple[str, bytes]:
    if not isinstance(entry, dict) or not isinstance(entry.get("sig"), str):
        raise _bad_envelope("each signature needs a base64 'sig' string")
    kid = entry.get("keyid", "")
    if not isinstance(kid, str):
        raise _bad_envelope("signature keyid must be a string")
    return kid.lower(), _b64(entry["sig"], "sig")


def _b64(text: str, field: str) -> bytes:
    """DSSE allows standard or URL-safe base64; accept both, reject anything else."""
    try:
        if "-" in text or "_" in text:
            return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        return binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except (binascii.Error, ValueError):  # UnicodeEncodeError is a ValueError
        raise _bad_envelope(f"{field} is not valid base64") from None


def _bad_envelope(what: str) -> VerifyError:
    return VerifyError("bad-envelope", f"Manifest.json.dsse is malformed: {what}; "
                       f"re-sign with `doit build_cache`", "Manifest.json.dsse")
