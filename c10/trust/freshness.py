"""Freshness, as a TUF client keeps it: the anti-rollback state, its time floor, the validity
period, and the sector a cache is for."""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import blake3

from c10.errors import VerifyError
from c10.store import atomic
from c10.store.layout import MANIFEST_NAME
from c10.trust.files import REBUILD
from c10.trust.manifest import parse_time
from c10.trust.strictjson import StrictJSONError, strict_loads

# 1: "caches" only (still read); 2: + "sectors" (the floor per signing key and sector) and
# "time_floor" (the newest issued_at seen, the last verification).
STATE_FORMAT = 2
# How far a build host's clock may run ahead of this one: a Manifest issued later than now + this
# is not yet valid, and a clock further behind the newest issued_at seen has gone back.
CLOCK_SKEW = timedelta(minutes=5)
_STATE_DEPTH = 8  # format 2 nests 4 deep (sectors > keyid > sector > record)
_STATE_MAX = 64 << 20
_TIME = "%Y-%m-%dT%H:%M:%SZ"


@dataclass
class Freshness:
    """What the freshness checks read and found, for record_state once every check passed."""

    state_path: Path | None
    state: dict
    loaded: bytes | None      # the state as it was read (serialized); None: there was none
    first_use: bool | None    # no state for this cache_id before; None: no state is kept
    area: str | None          # the Manifest's runtime.area.name
    sector: str | None        # the sector's key in the state; None: the Manifest names no area


def check_freshness(manifest: dict, payload: bytes, signers: tuple[str, ...], now: datetime,
                    state_path: Path | None, area: str | None = None) -> Freshness:
    """The sector (`area`: the name the cache must carry, None to accept any), then, against the
    state: the clock, the version of this cache, the issued_at of this key's sector; then the
    validity period. VerifyError at the first failure; the state is written by record_state."""
    name, sector = manifest_area(manifest)
    check_area(name, area)
    now = _utc(now)
    if state_path is None:
        check_expiry(manifest, now)
        return Freshness(None, {}, None, None, name, sector)
    path = Path(state_path)
    state, loaded = _load_state(path)
    _check_clock(state["time_floor"], now, path)
    _check_cache(state["caches"].get(manifest["cache_id"]), manifest, payload, path)
    _check_sector(state["sectors"], sector, name, signers, manifest, path)
    check_expiry(manifest, now)
    first_use = manifest["cache_id"] not in state["caches"]
    return Freshness(path, state, loaded, first_use, name, sector)




def _check_cache(seen: dict | None, manifest: dict, payload: bytes, state_path: Path) -> None:
    if not seen:
        return
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


def _check_sector(sectors: dict, sector: str | None, name: str | None, signers, manifest: dict,
                  state_path: Path) -> None:
    """A key's newest cache of a sector is never replaced by an older one, whatever its cache id
    (a new cache id starts its versions afresh: issued_at is what orders them)."""
    if sector is None:
        return
    issued = parse_time(manifest["issued_at"])
    for kid in signers:
        seen = sectors.get(kid, {}).get(sector)
        if seen and issued < parse_time(seen["issued_at"]):
            raise VerifyError("rollback", f"Manifest of cache {manifest['cache_id']} was issued "
                              f"at {manifest['issued_at']}, before cache {seen['cache_id']} "
                              f"(version {seen['version']}, issued at {seen['issued_at']}) of the "
                              f"same {_sector_label(name, sector)} and key {kid[:16]} already "
                              f"verified (state {state_path}); an older cache never replaces a "
                              f"newer one of its sector: copy the newest cache, or {REBUILD}",
                              MANIFEST_NAME)


def manifest_area(manifest: dict) -> tuple[str | None, str | None]:
    """(name, sector key) of the Manifest's signed runtime.area; (None, None) when it has none (a
    Manifest from before the runtime spec). An unnamed area's sector is its bbox and zooms."""
    runtime = manifest.get("runtime")
    area = runtime.get("area") if isinstance(runtime, dict) else None
    if area is None:
        return None, None
    name = area.get("name") if isinstance(area, dict) else None
    if not isinstance(area, dict) or not (name is None or isinstance(name, str)):
        raise VerifyError("bad-manifest", "Manifest.json is malformed: its runtime area is not a "
                          "table with a string or null name; rebuild with `doit build_cache`",
                          MANIFEST_NAME)
    if name is not None:
        return name, "name:" + name
    where = json.dumps([area.get("bbox"), area.get("zooms")], sort_keys=True,
                       separators=(",", ":"))
    return None, "bbox:" + where


def _sector_label(name: str | None, sector: str) -> str:
    return f"area {name!r}" if name is not None else f"unnamed area (bbox, zooms {sector[5:]})"


def check_area(name: str | None, expected: str | None) -> None:
    """`c10 verify --area NAME`: the cache must be the one signed for that sector."""
    if expected is None or name == expected:
        return
    have = (f"area {name!r}" if name is not None else
            "no named area (its c10.toml sets no area.name)")
    raise VerifyError("wrong-area", f"this cache is signed for {have}, not {expected!r}: it is "
                      f"another sector's cache; copy the cache built for {expected!r}, or check "
                      f"the name given to `c10 verify --area`", MANIFEST_NAME)


def _check_clock(floor: dict, now: datetime, state_path: Path) -> None:
    """TUF's freeze defence needs a clock that only goes forward: never behind the last
    verification, nor (beyond CLOCK_SKEW) behind the newest Manifest this host accepted."""
    verified, newest = floor.get("verified_at"), floor.get("issued_at")
    if verified is not None and now < parse_time(verified):
        raise _clock_went_back(now, f"the last verification on this host ({verified})",
                               state_path)
    if newest is not None and now + CLOCK_SKEW < parse_time(newest):
        raise _clock_went_back(now, f"{newest}, when the newest Manifest this host verified "
                               f"was issued", state_path)


def _clock_went_back(now: datetime, what: str, state_path: Path) -> VerifyError:
    return VerifyError("clock-went-back", f"this host's clock says {_iso(now)}, before {what} "
                       f"(state {state_path}): the clock was set back, which would let an "
                       f"expired or withheld cache pass; set the clock (NTP, GNSS) and verify "
                       f"again", MANIFEST_NAME)


def check_expiry(manifest: dict, now: datetime) -> None:
    """The validity period: issued no later than now + CLOCK_SKEW (not-yet-valid), and not
    expired."""
    now = _utc(now)
    if parse_time(manifest["issued_at"]) > now + CLOCK_SKEW:
        raise VerifyError("not-yet-valid", f"Manifest is issued at {manifest['issued_at']}, more "
                          f"than {CLOCK_SKEW.seconds // 60} minutes after this host's clock "
                          f"({_iso(now)}): one of the two clocks is wrong; set this host's clock "
                          f"(NTP, GNSS), or fix the build host's and re-sign with "
                          f"`doit build_cache`", MANIFEST_NAME)
    if now >= parse_time(manifest["expires"]):
        raise VerifyError("expired", f"Manifest expired at {manifest['expires']} (now "
                          f"{_iso(now)}); re-sign a fresh Manifest with `doit build_cache` and "
                          f"copy it", MANIFEST_NAME)


# ---------------------------------------------------------------- the state file

def _load_state(path: Path) -> tuple[dict, bytes | None]:
    """The state (format 1 or 2, as format 2 in memory) and its serialized form as read."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {"format": STATE_FORMAT, "caches": {}, "sectors": {}, "time_floor": {}}, None
    except OSError as exc:
        raise _bad_state(path, exc.strerror or type(exc).__name__) from None
    try:
        state = strict_loads(data, max_depth=_STATE_DEPTH, max_bytes=_STATE_MAX)
    except StrictJSONError as exc:
        raise _bad_state(path, str(exc)) from None
    problem = _state_problem(state)
    if problem:
        raise _bad_state(path, problem)
    state.setdefault("format", 1)
    state.setdefault("sectors", {})
    state.setdefault("time_floor", {})
    return state, _dumps(state)


def _state_problem(state: object) -> str | None:
    if not isinstance(state, dict):
        return "not a JSON object"
    fmt = state.get("format", 1)
    if type(fmt) is not int or fmt < 1:
        return f"format {fmt!r}"
    if fmt > STATE_FORMAT:
        return f"format {fmt}, written by a newer c10 (this one reads 1 to {STATE_FORMAT})"
    caches, sectors = state.get("caches"), state.get("sectors", {})
    floor = state.get("time_floor", {})
    if not isinstance(caches, dict) or not all(_state_entry_ok(v) for v in caches.values()):
        return "unexpected structure"
    if not isinstance(sectors, dict) or not all(
            isinstance(by, dict) and all(_sector_entry_ok(r) for r in by.values())
            for by in sectors.values()):
        return "unexpected structure of its sectors"
    if not isinstance(floor, dict) or not all(_time_ok(floor[k]) for k in
                                              ("issued_at", "verified_at") if k in floor):
        return "unexpected structure of its time floor"
    return None


def _state_entry_ok(entry: object) -> bool:
    return (isinstance(entry, dict) and type(entry.get("version")) is int
            and isinstance(entry.get("manifest_blake3"), str))


def _sector_entry_ok(entry: object) -> bool:
    return (isinstance(entry, dict) and _time_ok(entry.get("issued_at"))
            and isinstance(entry.get("cache_id"), str) and type(entry.get("version")) is int)


def _time_ok(value: object) -> bool:
    try:
        return isinstance(value, str) and parse_time(value) is not None
    except ValueError:
        return False


def _bad_state(path: Path, why: str) -> VerifyError:
    # Fail closed: resetting the state silently would re-open every rollback.
    return VerifyError("bad-state", f"trusted state {path} is unreadable ({why}); restore it "
                       f"from backup, or delete it to trust the next verified cache afresh "
                       f"(`rm {path}`)", str(path))


def record_state(fresh: Freshness, manifest: dict, payload: bytes, signers: tuple[str, ...],
                 now: datetime) -> bool:
    """After every check passed: the highest version of this cache, the newest issued_at of each
    signer's sector, the time floor; written (format 2) only when something changed."""
    if fresh.state_path is None:
        return False
    state, issued = fresh.state, manifest["issued_at"]
    cache_id, version = manifest["cache_id"], manifest["version"]
    seen = state["caches"].get(cache_id)
    if not seen or seen["version"] < version:
        state["caches"][cache_id] = {
            "version": version, "manifest_blake3": blake3.blake3(payload).hexdigest(),
            "keyid": ",".join(signers), "expires": manifest["expires"], "issued_at": issued,
            "area": fresh.area}
    if fresh.sector is not None:
        for kid in signers:
            by_sector = state["sectors"].setdefault(kid, {})
            old = by_sector.get(fresh.sector)
            if old is None or parse_time(old["issued_at"]) < parse_time(issued):
                by_sector[fresh.sector] = {"issued_at": issued, "cache_id": cache_id,
                                           "version": version, "area": fresh.area}
    floor = state["time_floor"]
    floor["issued_at"] = _later(floor.get("issued_at"), issued)
    floor["verified_at"] = _later(floor.get("verified_at"), _iso(_utc(now)))
    state["format"] = STATE_FORMAT
    data = _dumps(state)
    if data == fresh.loaded:
        return False
    try:
        atomic.write_bytes(fresh.state_path, data, mode=0o600)
    except OSError as exc:  # unrecorded, a later rollback to this version would pass: fail
        raise _bad_state(fresh.state_path, f"cannot write it: {exc.strerror}") from None
    return True


def _dumps(state: dict) -> bytes:
    return json.dumps(state, sort_keys=True, indent=1, ensure_ascii=True).encode() + b"\n"


def _later(old: str | None, new: str) -> str:
    return new if old is None or parse_time(new) > parse_time(old) else old


def _utc(moment: datetime) -> datetime:
    """`now` without a timezone is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime(_TIME)
