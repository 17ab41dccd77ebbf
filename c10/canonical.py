"""Canonical JSON, the one spelling of every identity key and of the Manifest's bytes."""
from __future__ import annotations

import hashlib
import json


def canonical_json(value: object) -> bytes:
    """Sorted keys, no spaces, UTF-8, no NaN or Infinity: equal values give equal bytes (DVC's
    dict_hash does the same for its stage cache)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def digest(value: object) -> str:
    """sha256 hex of canonical_json(value): the form of every key c10 computes."""
    return hashlib.sha256(canonical_json(value)).hexdigest()
