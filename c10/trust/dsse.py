"""DSSE envelopes (Ed25519 over PAE) of the Manifest: sign, parse strictly, verify.

Spec: https://github.com/secure-systems-lab/dsse, envelope.md ("the envelope") and protocol.md
("the protocol"). Strict where DSSE is strict (decoding, PAE, one accepted key counted once),
lenient where it is lenient (either base64 alphabet, padding optional, keyid an optional hint),
and closed where c10 is the only producer (exact fields, at most MAX_SIGNATURES, Ed25519 only).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from c10.errors import VerifyError
from c10.store.layout import ENVELOPE_NAME
from c10.trust.keys import keyid, raw_public
from c10.trust.strictjson import StrictJSONError, strict_loads

PAYLOAD_TYPE = "application/vnd.c10.manifest+json"

WHERE = ENVELOPE_NAME
RESIGN = "re-sign on the build host with `doit build_cache` and copy the cache again"
MAX_SIGNATURES = 8  # c10 writes one; room for co-signers, never thousands to try
SIG_BYTES = 64  # Ed25519 (RFC 8032 sec. 5.1.6): R || S
ENVELOPE_DEPTH = 3  # object > signatures list > signature object; nothing nests deeper
ENVELOPE_SLACK = 64 * 1024  # payloadType, MAX_SIGNATURES signatures with keyids, JSON syntax
_FIELDS = frozenset({"payloadType", "payload", "signatures"})
_SIG_FIELDS = frozenset({"sig", "keyid"})


@dataclass(frozen=True)
class Envelope:
    """A decoded envelope: nothing in it is trusted until verify_envelope_signers says so."""

    payload_type: str
    payload: bytes
    signatures: tuple[tuple[str, bytes], ...]  # (keyid hint, "" when unset; 64 signature bytes)


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 Pre-Authentication Encoding (protocol, "Signature Definition"): what is signed."""
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


def envelope_size_limit(manifest_size: int) -> int:
    """The most bytes the envelope of a `manifest_size`-byte payload needs: its padded base64 plus
    ENVELOPE_SLACK. A bigger file is padded (or another Manifest's) and is refused unread."""
    return 4 * -(-manifest_size // 3) + ENVELOPE_SLACK


def parse_envelope(raw: bytes, max_bytes: int) -> Envelope:
    """Decode the envelope file's bytes or raise VerifyError("bad-envelope").

    The protocol ("Protocol", "To verify") says: "Receive and decode ... Reject if decoding
    fails". Decoding here is strict JSON (RFC 8259 leaves duplicate keys undefined, so two
    readers could see two envelopes; no NaN/Infinity; depth and size bounded), then exactly the
    envelope's fields, then strict base64."""
    try:
        obj = strict_loads(raw, max_depth=ENVELOPE_DEPTH, max_bytes=max_bytes)
    except StrictJSONError as exc:
        raise _bad_envelope(f"not strict JSON ({_clip(str(exc), 120)})") from None
    except (RecursionError, MemoryError, UnicodeError) as exc:  # never a traceback on the aircraft
        raise _bad_envelope(f"not strict JSON ({type(exc).__name__})") from None
    return envelope_from_object(obj)


def envelope_from_object(obj: object) -> Envelope:
    """The Envelope of an already-parsed JSON value (a dict), checked as parse_envelope does."""
    if not isinstance(obj, dict):
        raise _bad_envelope(f"the top level is a JSON {_json_type(obj)}, not an object")
    # Envelope, "Parsing rules": payload, payloadType, signatures and signature.sig are REQUIRED.
    # The same section says consumers MUST ignore fields it does not define; c10 deviates on
    # purpose: c10 is the only producer of this file (securesystemslib writes no others), and an
    # ignored field is unsigned attacker-chosen bytes that rides to the aircraft and that another
    # reader of the file might not ignore. An empty signatures list (DSSE-legal) verifies nothing.
    _exact_fields(obj, _FIELDS, _FIELDS, "the envelope")
    ptype, payload, sigs = obj["payloadType"], obj["payload"], obj["signatures"]
    if not isinstance(ptype, str):
        raise _bad_envelope(f"payloadType is a JSON {_json_type(ptype)}, not a string")
    if not isinstance(payload, str):
        raise _bad_envelope(f"payload is a JSON {_json_type(payload)}, not a base64 string")
    if not isinstance(sigs, list) or not sigs:
        raise _bad_envelope("signatures must be a non-empty list")
    if len(sigs) > MAX_SIGNATURES:
        raise _bad_envelope(f"{len(sigs)} signatures, more than the {MAX_SIGNATURES} c10 accepts")
    entries = tuple(_signature(entry, n) for n, entry in enumerate(sigs, 1))
    return Envelope(ptype, _b64(payload, "payload"), entries)


def _signature(entry: object, n: int) -> tuple[str, bytes]:
    if not isinstance(entry, dict):
        raise _bad_envelope(f"signature #{n} is a JSON {_json_type(entry)}, not an object")
    _exact_fields(entry, frozenset({"sig"}), _SIG_FIELDS, f"signature #{n}")
    # Envelope, "Parsing rules": keyid is OPTIONAL, and "an unset field MUST be treated the same
    # as set-but-empty": a missing keyid and "" are the same hint (none).
    kid = entry.get("keyid", "")
    if not isinstance(kid, str):
        raise _bad_envelope(f"signature #{n}: keyid is a JSON {_json_type(kid)}, not a string")
    if not isinstance(entry["sig"], str):
        raise _bad_envelope(f"signature #{n}: sig is a JSON {_json_type(entry['sig'])}, "
                            f"not a base64 string")
    sig = _b64(entry["sig"], f"signature #{n}'s sig")
    if len(sig) != SIG_BYTES:
        raise _bad_envelope(f"signature #{n} decodes to {len(sig)} bytes; an Ed25519 signature "
                            f"is {SIG_BYTES}")
    return kid, sig


def _exact_fields(obj: dict, required: frozenset, allowed: frozenset, what: str) -> None:
    missing = sorted(required - obj.keys())
    if missing:
        raise _bad_envelope(f"{what} lacks the required field(s) {', '.join(missing)}")
    unknown = [k for k in obj if k not in allowed]
    if unknown:
        names = ", ".join(_show(k, 40) for k in unknown[:3]) + (", ..." if len(unknown) > 3 else "")
        raise _bad_envelope(f"{what} has {len(unknown)} field(s) DSSE does not define ({names})")


def _b64(text: str, field: str) -> bytes:
    """Strict RFC 4648 base64 in either alphabet, padding optional.

    Envelope, "Standard JSON envelope", and the protocol: "Either standard or URL-safe base64
    encodings are allowed. Signers may use either, and verifiers MUST accept either." Nothing
    else is base64: no whitespace, no junk, nothing after the padding, no mixed alphabets, no
    non-zero unused bits. The one test for all of it: re-encoding the bytes gives back the text.
    """
    body = text.rstrip("=")
    pad = len(text) - len(body)
    if (pad and (pad > 2 or len(text) % 4)) or len(body) % 4 == 1:
        raise _bad_envelope(f"{field} is not base64 (length {len(text)} or padding is wrong)")
    try:
        ascii_body = body.encode("ascii")
    except UnicodeEncodeError:
        raise _bad_envelope(f"{field} is not base64 (non-ASCII characters)") from None
    urlsafe = b"-" in ascii_body or b"_" in ascii_body
    std = ascii_body.translate(bytes.maketrans(b"-_", b"+/")) if urlsafe else ascii_body
    try:
        decoded = binascii.a2b_base64(std + b"=" * (-len(std) % 4), strict_mode=True)
    except (binascii.Error, ValueError, MemoryError):
        raise _bad_envelope(f"{field} is not base64 (characters outside the alphabet)") from None
    encode = base64.urlsafe_b64encode if urlsafe else base64.b64encode
    if encode(decoded).rstrip(b"=") != ascii_body:
        raise _bad_envelope(f"{field} is not canonical base64 (mixed alphabets, junk characters "
                            f"or non-zero unused bits)")
    return decoded


def verify_envelope(
    envelope: Envelope | dict, trusted: dict[str, Ed25519PublicKey], threshold: int = 1
) -> bytes:
    """Return the payload when >= `threshold` DISTINCT trusted keys signed it; else VerifyError."""
    return verify_envelope_signers(envelope, trusted, threshold)[0]


def verify_envelope_signers(
    envelope: Envelope | dict, trusted: dict[str, Ed25519PublicKey], threshold: int = 1
) -> tuple[bytes, tuple[str, ...]]:
    """verify_envelope, also returning the sorted keyids whose signatures verified.

    The protocol, "Multi-signature Verification": each signature verified against the trusted
    keys its keyid narrows them to, failures skipped, the accepted KEYS collected in a set (one
    key counts once, so one key never satisfies threshold 2), reject below `threshold`.
    KEYID is an "unauthenticated hint" that "MUST NOT be used for security decisions" (protocol,
    "Signature Definition"), so it never makes a signature count: only verification does.
      - keyid names a trusted key: only that key is tried, and a failure rejects the envelope
        (bad-signature) even beside a good signature. Stricter than the spec's "skip": c10's
        own signer writes exactly this shape, so such a failure means an altered envelope.
      - keyid missing, empty or unknown (another tool's keyid scheme, e.g. securesystemslib's):
        every trusted key not yet accepted is tried; one that verifies counts for its key. One
        that verifies under none is skipped: it cannot be told apart from a co-signer's.
    """
    env = envelope if isinstance(envelope, Envelope) else envelope_from_object(envelope)
    # Protocol, "To verify": "Reject if PAYLOAD_TYPE is not a supported type."
    if env.payload_type != PAYLOAD_TYPE:
        raise VerifyError("bad-payload-type", f"envelope payloadType is "
                          f"{_show(env.payload_type, 80)}, expected {PAYLOAD_TYPE!r}; {RESIGN}",
                          WHERE)
    signed, need = pae(env.payload_type, env.payload), max(threshold, 1)
    accepted: set[bytes] = set()
    by_hint = {kid.lower(): key for kid, key in trusted.items()}
    unattributed = []
    for n, (hint, sig) in enumerate(env.signatures, 1):  # first every named one: each must hold
        named = by_hint.get(hint.lower()) if hint else None
        if named is None:
            unattributed.append(sig)
        elif _sig_ok(named, sig, signed):
            accepted.add(raw_public(named))
        else:
            raise _bad_signature(n, keyid(named))
    for sig in unattributed:  # then the rest, only while short: planted ones cost no verify
        if len(accepted) >= need:
            break
        for key in trusted.values():
            raw = raw_public(key)
            if raw not in accepted and _sig_ok(key, sig, signed):
                accepted.add(raw)
                break
    _check_threshold(len(accepted), need, len(env.signatures), trusted)
    return env.payload, tuple(sorted(hashlib.sha256(raw).hexdigest() for raw in accepted))


def _sig_ok(key: Ed25519PublicKey, sig: bytes, message: bytes) -> bool:
    try:
        key.verify(sig, message)
    except InvalidSignature:
        return False
    return True


def _bad_signature(n: int, kid: str) -> VerifyError:
    return VerifyError("bad-signature", f"signature #{n} names trusted key {kid} but does not "
                       f"verify: the Manifest or its envelope was altered; {RESIGN}", WHERE)


def _check_threshold(good: int, threshold: int, total: int, trusted: dict) -> None:
    if good >= threshold:
        return
    if good == 0:
        raise VerifyError("unknown-key", f"none of the {total} signature(s) verifies under a "
                          f"trusted key (trusted keyids: {', '.join(sorted(trusted)) or 'none'}): "
                          f"pass the operator's public key with --trusted-keys FILE; if it is "
                          f"already trusted, the envelope was altered: {RESIGN}", WHERE)
    raise VerifyError("threshold", f"{good} distinct trusted key(s) signed, {threshold} required; "
                      f"have more trusted operators co-sign the Manifest, or {RESIGN}", WHERE)


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
             float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _show(text: str, limit: int) -> str:
    """Attacker-chosen text for a message: printable ASCII (no lone surrogates reach a terminal),
    clipped."""
    shown = ascii(text)
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"


def _clip(text: str, limit: int) -> str:
    shown = text.encode("ascii", "backslashreplace").decode("ascii")
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def _bad_envelope(what: str) -> VerifyError:
    return VerifyError("bad-envelope", f"{WHERE} is malformed: {what}; {RESIGN}", WHERE)
