"""Tile-list keys: the first 8 bytes of each tile's blake3 in a tile list, kept by the list's own
blake3 between builds (LIST_KEYS). The descriptor store's hint of which tiles the committed shards
may hold: never a trust decision, so unsigned (a wrong key costs a computation or a scan, never a
row: c10.features.descriptor_store)."""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Mapping

import numpy as np

from c10.store import atomic
from c10.store.layout import LIST_KEYS

MAGIC = b"c10 tile-list keys 1\n"
_HEADER = struct.Struct("<Q")  # byte length of the JSON header: [[list blake3, key count], ...]
_HEX = bytes.maketrans(b"0123456789abcdef", bytes(range(16)))
_EMPTY = np.zeros(0, "<u8")


def row_keys(data: bytes) -> np.ndarray:
    """The first 8 bytes of each row's blake3 in a tile list's bytes, as little-endian uint64.
    Each row ends `[path, size, "blake3"]` in canonical JSON (c10.trust.tilelists): the 16 hex
    digits 65 bytes before each `"]`, taken by position (a regex over 10⁶ rows is ~5x slower)."""
    raw = np.frombuffer(data, np.uint8)
    ends = np.flatnonzero(raw[65:] == ord("]")) + 65
    ends = ends[raw[ends - 1] == ord('"')]
    nibbles = np.frombuffer(data.translate(_HEX), np.uint8)[(ends - 65)[:, None] + np.arange(16)]
    return np.ascontiguousarray((nibbles[:, 0::2] << 4) | nibbles[:, 1::2]).view("<u8").ravel()


def digest_keys(digests: list[str]) -> np.ndarray:
    """The same keys from hex blake3 digests (a list this build writes, before it is read back)."""
    if not digests:
        return _EMPTY
    return np.frombuffer(bytes.fromhex("".join(d[:16] for d in digests)), "<u8")


def read_list_keys(root: Path) -> dict[str, np.ndarray]:
    """list blake3 -> its tiles' keys, as the last Manifest write left them; {} when the file is
    missing, torn or not one of ours (every list is then read again)."""
    try:
        data = (Path(root) / LIST_KEYS).read_bytes()
    except OSError:
        return {}
    try:
        return _parse(data)
    except (ValueError, TypeError, struct.error):
        return {}


def _parse(data: bytes) -> dict[str, np.ndarray]:
    if not data.startswith(MAGIC):
        return {}
    (size,) = _HEADER.unpack_from(data, len(MAGIC))
    start = len(MAGIC) + _HEADER.size
    header = json.loads(data[start:start + size])
    body = memoryview(data)[start + size:]
    if not isinstance(header, list) or len(body) % 8:
        return {}
    keys = np.frombuffer(body, "<u8")
    out, at = {}, 0
    for digest, count in header:
        if type(digest) is not str or type(count) is not int or count < 0:
            return {}
        out[digest] = keys[at:at + count]
        at += count
    return out if at == len(keys) else {}


def write_list_keys(root: Path, by_list: Mapping[str, np.ndarray]) -> None:
    """Replace LIST_KEYS by a rename, unsynced: a lost or torn file only costs reading the lists."""
    header = json.dumps([[d, len(k)] for d, k in by_list.items()], separators=(",", ":")).encode()
    parts = [MAGIC, _HEADER.pack(len(header)), header]
    parts += [np.ascontiguousarray(k, "<u8").tobytes() for k in by_list.values()]
    atomic.replace_unsynced(Path(root) / LIST_KEYS, b"".join(parts))
