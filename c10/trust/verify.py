"""`c10 verify DIR`: what the aircraft runs before takeoff; first failure wins, one reason each."""
from __future__ import annotations

import errno
import os
import stat
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from c10.errors import VerifyError
from c10.store.layout import ENVELOPE_NAME, MANIFEST_NAME
from c10.trust.dsse import (
    MAX_SIGNATURES,
    envelope_size_limit,
    parse_envelope,
    verify_envelope_signers,
)
from c10.trust.files import CONTROL_MAX, REBUILD, open_failure, read_control, read_regular
from c10.trust.freshness import check_freshness, record_state
from c10.trust.hashing import check_paths
from c10.trust.manifest import loads_manifest
from c10.trust.tilelists import expand_files
from c10.trust.tree import check_coverage, check_files

# Stable: scripts and the aircraft's arming logic branch on these. Never renumber.
EXIT_CODES: dict[str, int] = {
    "ok": 0,
    "missing-manifest": 10, "bad-envelope": 11, "bad-payload-type": 12, "no-trusted-keys": 13,
    "unknown-key": 14, "bad-signature": 15, "threshold": 16, "bad-trusted-key": 17,
    "envelope-mismatch": 20, "bad-manifest": 21, "schema-version": 22,
    "rollback": 30, "version-reuse": 31, "bad-state": 32, "clock-went-back": 33,
    "expired": 40, "not-yet-valid": 41,
    "bad-path": 50, "missing-file": 51, "symlink": 52, "special-file": 53, "hardlink": 54,
    "size-mismatch": 55, "hash-mismatch": 56, "unreadable": 57, "bad-mode": 58,
    "extra-file": 60,
    "platform-mismatch": 70, "wrong-area": 71,
    "internal": 99,  # any other exception inside verification: the cache is refused all the same
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
    first_use: bool | None = None  # no state for this cache before (TUF's trust on first use)
    area: str | None = None  # the sector it is signed for (runtime.area.name)
    # ground: tiles in tiles/ outside the signed area, listed by no Manifest, never shipped
    out_of_scope: int = 0


def verify_cache(
    cache_root: Path,
    *,
    trusted: dict[str, Ed25519PublicKey],
    now: datetime,
    state_path: Path | None,
    airborne_fingerprints: dict | None = None,
    threshold: int = 1,
    area: str | None = None,
    strict: bool | None = None,
) -> VerifyResult:
    """Check the cache in the documented order; raise VerifyError at the first failure.

    `now` without a timezone is taken as UTC. `state_path` None skips the rollback check
    (a ground tool inspecting a copy); the aircraft always passes its state file. `area`: the
    sector name the cache must be signed for (None: any). `strict` (default: airborne, i.e. when
    `airborne_fingerprints` is given): the tree must be a flight image, exactly the listed files and
    the Manifest pair (c10.trust.tree). Any other exception becomes VerifyError("internal"): the
    cache is refused with a reason, never a traceback.
    """
    start = time.perf_counter()
    try:
        strict = airborne_fingerprints is not None if strict is None else strict
        return _verify(Path(cache_root), trusted, now, state_path, airborne_fingerprints,
                       threshold, start, area, strict)
    except VerifyError as err:
        err.exit_code = EXIT_CODES.get(err.reason, 1)
        raise
    except Exception as exc:  # RecursionError, MemoryError, UnicodeError, a bug
        raise internal_error(exc) from exc


def internal_error(exc: BaseException) -> VerifyError:
    """An unexpected exception as a verdict: reason `internal`, the cache refused."""
    detail = str(exc)
    detail = detail if len(detail) <= 200 else detail[:200] + "..."
    err = VerifyError("internal", f"verification stopped on an unexpected "
                      f"{type(exc).__name__}{f' ({detail})' if detail else ''}, so the cache is "
                      f"refused; this is a fault of c10 or of this host (memory, stack): report "
                      f"it with the command line")
    err.exit_code = EXIT_CODES["internal"]
    return err


def _verify(root, trusted, now, state_path, airborne, threshold, start, area,
            strict) -> VerifyResult:
    payload, signers = _check_signature(root, trusted, threshold)
    _check_payload_matches(root, payload)
    manifest = loads_manifest(payload)
    fresh = check_freshness(manifest, payload, signers, now, state_path, area)
    check_paths(manifest["files"])  # the root's, before a tile list is opened
    files = expand_files(root, manifest)
    total, tree = check_files(root, files, strict)
    pending = check_coverage(root, tree, manifest, strict, files)
    if airborne is not None:
        _check_platform(manifest["engines"], airborne)
    updated = record_state(fresh, manifest, payload, signers, now)
    return VerifyResult(manifest["cache_id"], manifest["version"], len(files),
                        total, ",".join(signers), time.perf_counter() - start, updated, pending,
                        fresh.first_use, fresh.area, len(tree.out_of_scope))


def _check_signature(root: Path, trusted, threshold) -> tuple[bytes, tuple[str, ...]]:
    if not trusted:
        raise VerifyError("no-trusted-keys", "no trusted keys given, so nothing can be verified; "
                          "pass --trusted-keys FILE or copy the operator's public key into "
                          "~/.config/c10/trusted/ (never trust a key the cache names: c10.toml is "
                          "unsigned)")
    manifest_size = _manifest_size(root)
    limit = envelope_size_limit(manifest_size)
    raw = _read_envelope(root, limit, manifest_size)
    try:
        return verify_envelope_signers(parse_envelope(raw, limit), trusted, threshold)
    except (RecursionError, MemoryError, UnicodeError) as exc:  # a verdict, never a traceback
        raise VerifyError("bad-envelope", f"{ENVELOPE_NAME} cannot be decoded "
                          f"({type(exc).__name__}); {REBUILD}", ENVELOPE_NAME) from None


def _manifest_size(root: Path) -> int:
    """lstat Manifest.json, before the envelope is opened: its size bounds the envelope's."""
    try:
        st = os.lstat(root / MANIFEST_NAME)
    except OSError as exc:
        raise open_failure(MANIFEST_NAME, exc) from None
    if stat.S_ISLNK(st.st_mode):
        raise open_failure(MANIFEST_NAME, OSError(errno.ELOOP, os.strerror(errno.ELOOP)))
    if not stat.S_ISREG(st.st_mode) or st.st_size > CONTROL_MAX:  # as read_control
        raise VerifyError("special-file", f"{MANIFEST_NAME} is not a regular file of sane size; "
                          f"{REBUILD}", MANIFEST_NAME)
    return st.st_size


def _read_envelope(root: Path, limit: int, manifest_size: int) -> bytes:
    """The envelope's bytes, refused unread when larger than any envelope of Manifest.json."""
    path = root / ENVELOPE_NAME
    try:
        raw = read_regular(path, limit)
        if raw is not None:
            return raw
        st = os.lstat(path)  # read_regular refuses a non-regular file and an oversized one alike
    except OSError as exc:
        raise open_failure(ENVELOPE_NAME, exc) from None
    if stat.S_ISREG(st.st_mode) and st.st_size > limit:
        raise VerifyError("bad-envelope", f"{ENVELOPE_NAME} has {st.st_size} bytes, more than the "
                          f"{limit} an envelope of the {manifest_size}-byte {MANIFEST_NAME} can "
                          f"need (its base64 and up to {MAX_SIGNATURES} signatures): it was padded "
                          f"or belongs to another Manifest.json (a build killed between its two "
                          f"writes, which the next `doit build_cache` completes); {REBUILD}",
                          ENVELOPE_NAME)
    raise VerifyError("special-file", f"{ENVELOPE_NAME} is not a regular file of sane size; "
                      f"{REBUILD}", ENVELOPE_NAME)


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


def verify_signed_manifest(cache_root: Path, *, trusted: dict[str, Ed25519PublicKey],
                           now: datetime | None, state_path: Path | None = None,
                           threshold: int = 1, area: str | None = None) -> dict:
    """The Manifest of a cache whose envelope verifies, whose payload is Manifest.json and which is
    fresh against `state_path` (recorded there, as verify_cache does; now=None: no freshness at
    all, for a build carrying its own files forward): what reading a cache needs before any file
    is opened; each file is then checked as it is read (c10.trust.files.read_listed)."""
    root = Path(cache_root)
    try:
        payload, signers = _check_signature(root, trusted, threshold)
        _check_payload_matches(root, payload)
        manifest = loads_manifest(payload)
        if now is not None:
            fresh = check_freshness(manifest, payload, signers, now, state_path, area)
            record_state(fresh, manifest, payload, signers, now)
    except VerifyError as err:
        err.exit_code = EXIT_CODES.get(err.reason, 1)
        raise
    except (RecursionError, MemoryError, UnicodeError) as exc:
        raise internal_error(exc) from None
    return manifest
