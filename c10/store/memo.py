"""Hints c10 leaves in a cache's .c10/, authenticated by a secret this host keeps outside it."""
from __future__ import annotations

import hmac
from pathlib import Path

import blake3


def read_authenticated(path: Path, secret: bytes | None) -> bytes | None:
    """The body write_authenticated saved at `path`, or None: missing, torn, or not written by c10
    on this host (its MAC, keyed by `secret`, does not match)."""
    if secret is None:
        return None
    try:
        raw = Path(path).read_bytes()
    except OSError:
        return None
    mac, _, body = raw.partition(b"\n")
    return body if hmac.compare_digest(mac, _mac(body, secret)) else None


def write_authenticated(path: Path, body: bytes, secret: bytes) -> None:
    """Save `body` under its MAC, atomically."""
    from c10.store import atomic

    atomic.write_bytes(path, _mac(body, secret) + b"\n" + body)


def _mac(body: bytes, secret: bytes) -> bytes:
    return blake3.blake3(body, key=secret).hexdigest().encode()
