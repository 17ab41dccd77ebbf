"""`c10 verify DIR`: what the aircraft runs before takeoff; first failure wins, one reason each."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from c10.errors import VerifyError
from c10.store.layout import ENVELOPE_NAME, MANIFEST_NAME
from c10.trust.dsse import verify_envelope_signers
from c10.trust.files import REBUILD, read_control
from c10.trust.freshness import check_expiry, check_rollback, record_state
from c10.trust.manifest import loads_manifest
from c10.trust.tree import check_coverage, check_files

# Stable: scripts and the aircraft's arming logic branch on these. Never renumber.
EXIT_CODES: dict[str, int] = {
    "ok": 0,
    "missing-manifest": 10, "bad-envelope": 11, "bad-payload-type": 12, "no-trusted-keys": 13,
    "unknown-key": 14, "bad-signature": 15, "threshold": 16,
    "envelope-mismatch": 20, "bad-manifest": 21, "schema-version": 22,
    "rollback": 30, "version-reuse": 31, "bad-state": 32,
    "expired": 40,
    "bad-path": 50, "missing-file": 51, "symlink": 52, "special-file": 53, "hardlink": 54,
    "size-mismatch": 55, "hash-mismatch": 56, "unreadable": 57,
    "extra-file": 60,
    "platform-mismatch": 70,
}


@dataclass(frozen=True)
class VerifyResult:
    """A cache that passed every check."""

    cache_id: str
    version: int
    files: int
    bytes: int
    keyid: str
    elapsed: float
    state_updated: bool = False
    pending: int = 0  # content-named files of an unfinished build, listed by no Manifest yet


def verify_cache(
    cache_root: Path,
    *,
    trusted: dict[str, Ed25519PublicKey],
    now: datetime,
    state_path: Path | None,
    airborne_fingerprints: dict | None = None,
    threshold: int = 1,
) -> VerifyResult:
    """Check the cache in the documented order; raise VerifyError at the first failure.

    `now` without a timezone is taken as UTC. `state_path` None skips the rollback check
    (a ground tool inspecting a copy); the aircraft always passes its state file.
    """
    start = time.perf_counter()
    try:
        return _verify(Path(cache_root), trusted, now, state_path, airborne_fingerprints,
                       threshold, start)
    except VerifyError as err:
        err.exit_code = EXIT_CODES.get(err.reason, 1)
        raise


def _verify(root, trusted, now, state_path, airborne, threshold, start) -> VerifyResult:
    payload, signers = _check_signature(root, trusted, threshold)
    _check_payload_matches(root, payload)
    manifest = loads_manifest(payload)
    state = check_rollback(manifest, payload, state_path)
    check_expiry(manifest, now)
    total, tree = check_files(root, manifest["files"])
    pending = check_coverage(root, tree, {f["path"] for f in manifest["files"]})
    if airborne is not None:
        _check_platform(manifest["engines"], airborne)
    updated = record_state(state_path, state, manifest, payload, signers)
    return VerifyResult(manifest["cache_id"], manifest["version"], len(manifest["files"]),
                        total, ",".join(signers), time.perf_counter() - start, updated, pending)


def _check_signature(root: Path, trusted, threshold) -> tuple[bytes, tuple[str, ...]]:
    if not trusted:
        raise VerifyError("no-trusted-keys", "no trusted keys given, so nothing can be verified; "
                          "pass --trusted-keys FILE or copy the operator's public key into "
                          "~/.config/c10/trusted/ (never trust a key the cache names: c10.toml is "
                          "unsigned)")
    raw = read_control(root, ENVELOPE_NAME)
    try:
        envelope = json.loads(raw)
    except ValueError:
        raise VerifyError("bad-envelope", f"{ENVELOPE_NAME} is not JSON; {REBUILD}",
                          ENVELOPE_NAME) from None
    return verify_envelope_signers(envelope, trusted, threshold)


def _check_payload_matches(root: Path, payload: bytes) -> None:
    if read_control(root, MANIFEST_NAME) != payload:
        raise VerifyError("envelope-mismatch", f"{MANIFEST_NAME} differs from the payload "
                          f"signed in {ENVELOPE_NAME} (edited, or a build was killed between "
                          f"the two writes); {REBUILD}", MANIFEST_NAME)


def _check_platform(engines: list[dict], airborne: dict) -> None:
    for eng in engines:
        backend, want = eng.get("backend"), eng.get("fingerprint")
        have = airborne.get(backend)
        if have != want:
            raise VerifyError("platform-mismatch", f"{eng.get('path')} was built for {backend} "
                              f"fingerprint {want!r}, this host is {have!r}; build the cache on "
                              f"this platform with `doit build_cache`", eng.get("path"))


def verify_to_json(outcome: VerifyResult | VerifyError) -> dict:
    """The `--json` line: ok + figures, or reason, message, path and exit code."""
    if isinstance(outcome, VerifyResult):
        return {"ok": True, "exit_code": 0, **asdict(outcome)}
    return {"ok": False, "reason": outcome.reason, "message": str(outcome),
            "path": outcome.path, "exit_code": EXIT_CODES.get(outcome.reason, 1)}

