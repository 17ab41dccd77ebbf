"""Freshness, as a TUF client keeps it: the anti-rollback state, expiry."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import blake3

from c10.errors import VerifyError
from c10.store import atomic
from c10.store.layout import MANIFEST_NAME
from c10.trust.files import REBUILD
from c10.trust.manifest import parse_time


def check_rollback(manifest: dict, payload: bytes, state_path: Path | None) -> dict:
    """Like a TUF client: never accept a version below (or a reused one beside) the highest seen."""
    if state_path is None:
        return {}
    state = _load_state(Path(state_path))
    seen = state.get("caches", {}).get(manifest["cache_id"])
    if not seen:
        return state
    version, digest = manifest["version"], blake3.blake3(payload).hexdigest()
    if version < seen["version"]:
        raise VerifyError("rollback", f"Manifest version {version} is older than version "
                          f"{seen['version']} already verified for cache {manifest['cache_id']} "
                          f"(state {state_path}); copy the current cache, or {REBUILD}",
                          MANIFEST_NAME)
    if version == seen["version"] and digest != seen["manifest_blake3"]:
        raise VerifyError("version-reuse", f"Manifest version {version} differs from the version "
                          f"{version} already verified (state {state_path}); a signer reused a "
                          f"version number: {REBUILD}", MANIFEST_NAME)
    return state


def _load_state(path: Path) -> dict:
    try:
        state = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {"format": 1, "caches": {}}
    except (OSError, ValueError) as exc:
        raise _bad_state(path, str(exc)) from None
    caches = state.get("caches") if isinstance(state, dict) else None
    if not isinstance(caches, dict) or not all(_state_entry_ok(v) for v in caches.values()):
        raise _bad_state(path, "unexpected structure")
    return state


def _state_entry_ok(entry: object) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("version"), int)
            and isinstance(entry.get("manifest_blake3"), str))


def _bad_state(path: Path, why: str) -> VerifyError:
    # Fail closed: resetting the state silently would re-open every rollback.
    return VerifyError("bad-state", f"trusted state {path} is unreadable ({why}); restore it "
                       f"from backup, or delete it to trust the next verified cache afresh "
                       f"(`rm {path}`)", str(path))


def check_expiry(manifest: dict, now: datetime) -> None:
    now = now if now.tzinfo else now.replace(tzinfo=timezone.utc)
    expires = parse_time(manifest["expires"])
    if now >= expires:
        raise VerifyError("expired", f"Manifest expired at {manifest['expires']} (now "
                          f"{now.astimezone(timezone.utc):%Y-%m-%dT%H:%M:%SZ}); re-sign a fresh "
                          f"Manifest with `doit build_cache` and copy it", MANIFEST_NAME)


def record_state(state_path, state, manifest, payload, signers) -> bool:
    """Persist the highest version only after every check passed."""
    if state_path is None:
        return False
    caches = state.setdefault("caches", {})
    seen = caches.get(manifest["cache_id"])
    if seen and seen["version"] >= manifest["version"]:
        return False
    caches[manifest["cache_id"]] = {
        "version": manifest["version"], "manifest_blake3": blake3.blake3(payload).hexdigest(),
        "keyid": ",".join(signers), "expires": manifest["expires"]}
    data = json.dumps(state, sort_keys=True, indent=1).encode() + b"\n"
    try:
        atomic.write_bytes(state_path, data, mode=0o600)
    except OSError as exc:  # unrecorded, a later rollback to this version would pass: fail
        raise _bad_state(Path(state_path), f"cannot write it: {exc.strerror}") from None
    return True

