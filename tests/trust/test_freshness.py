"""Freshness as a TUF client keeps it, from the attacker's side: trust on first use, the time floor
(a clock set back), a Manifest from the future, the sector a cache is signed for, and rollback per
signing key and sector across cache ids; state files of format 1 still load."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import blake3
import pytest
from test_verify import NOW, T0, Cache

from c10.trust.freshness import CLOCK_SKEW, STATE_FORMAT
from c10.trust.keys import keyid
from c10.trust.verify import EXIT_CODES, verify_to_json

NORTH = [50.43, 30.49, 50.47, 30.56]
SOUTH = [50.33, 30.49, 50.37, 30.56]


def area(name, bbox=NORTH):
    """runtime.area as the Manifest writer records it."""
    return {"name": name, "bbox": list(bbox), "zooms": [18], "sector_class": "stable_rear"}


def sign(cache, where=None, **over):
    """Re-sign `cache` with Manifest fields `over` and, unless None, runtime.area `where`."""
    body = cache.manifest(**over)
    if where is not None:
        body["runtime"] = {**body.get("runtime", {}), "area": where}
    cache.sign(body)
    return body


@pytest.fixture
def cache(tmp_path):
    (tmp_path / "cache").mkdir()
    made = Cache(tmp_path / "cache", tmp_path / "keys")
    sign(made, area("kyiv-north"))
    return made


def another(cache, tmp_path, name, where, *, same_key=True, **over):
    """Another cache dir (its own cache id), by the same operator key unless told otherwise,
    verified against the same state file."""
    (tmp_path / name).mkdir()
    made = Cache(tmp_path / name, tmp_path / f"keys-{name}", key=cache.key if same_key else None)
    made.state = cache.state
    sign(made, where, cache_id=name, **over)
    return made


def state(cache) -> dict:
    return json.loads(cache.state.read_bytes())


# ---------------------------------------------------------------- trust on first use

def test_first_use_then_not(cache, tmp_path):
    first = cache.verify()
    assert first.first_use is True and first.area == "kyiv-north" and first.state_updated
    assert verify_to_json(first)["first_use"] is True
    again = cache.verify()
    assert again.first_use is False and verify_to_json(again)["first_use"] is False
    other = another(cache, tmp_path, "sector-8", area("kyiv-south", SOUTH))
    assert other.verify().first_use is True  # first use is per cache, not per state file
    assert cache.verify(state_path=None).first_use is None  # no state kept: nothing to say


def test_the_state_is_written_only_when_it_changes(cache):
    assert cache.verify().state_updated
    assert cache.verify().state_updated is False  # same Manifest, same second
    assert cache.verify(now=NOW + timedelta(minutes=1)).state_updated  # the time floor moved
    floor = state(cache)["time_floor"]
    assert floor == {"issued_at": "2026-03-01T12:00:00Z", "verified_at": "2026-03-01T13:01:00Z"}


# ---------------------------------------------------------------- the clock

def test_clock_set_back_behind_the_last_verification(cache):
    cache.verify(now=NOW)
    before = cache.state.read_bytes()
    assert cache.reason(now=NOW - timedelta(minutes=30)) == "clock-went-back"
    assert cache.reason(now=NOW - timedelta(seconds=1)) == "clock-went-back"
    assert cache.state.read_bytes() == before  # a refused verification records nothing
    assert cache.verify(now=NOW + timedelta(seconds=1)).version == 1


def test_clock_behind_the_newest_issued_at_beyond_the_skew(cache):
    """A Manifest this host accepted was issued at T0+2h: its clock cannot now say T0+1h."""
    newest = T0 + timedelta(hours=2)
    cache.state.parent.mkdir(parents=True)
    cache.state.write_text(json.dumps({"format": 2, "caches": {}, "sectors": {},
                                       "time_floor": {"issued_at": "2026-03-01T14:00:00Z"}}))
    assert cache.reason(now=NOW) == "clock-went-back"
    assert cache.verify(now=newest - CLOCK_SKEW + timedelta(seconds=1)).version == 1


def test_a_clock_reset_to_1970_cannot_freeze_a_first_use(cache):
    assert cache.reason(now=datetime(1970, 1, 1, tzinfo=timezone.utc)) == "not-yet-valid"


def test_issued_at_in_the_future_is_not_yet_valid(cache):
    sign(cache, area("kyiv-north"), issued_at=NOW + timedelta(hours=1),
         expires=NOW + timedelta(days=7))
    assert cache.reason() == "not-yet-valid"
    assert not cache.state.exists()
    sign(cache, area("kyiv-north"), issued_at=NOW + CLOCK_SKEW - timedelta(seconds=1),
         expires=NOW + timedelta(days=7))
    assert cache.verify().version == 1  # a build host a little ahead is tolerated


def test_exit_codes_of_the_new_reasons():
    assert (EXIT_CODES["clock-went-back"], EXIT_CODES["not-yet-valid"], EXIT_CODES["wrong-area"],
            EXIT_CODES["internal"], EXIT_CODES["no-trusted-keys"]) == (33, 41, 71, 99, 13)


# ---------------------------------------------------------------- the sector

def test_another_sectors_cache_is_the_wrong_area(cache, tmp_path):
    south = another(cache, tmp_path, "sector-8", area("kyiv-south", SOUTH))
    assert south.reason(area="kyiv-north") == "wrong-area"
    assert south.verify(area="kyiv-south").area == "kyiv-south"
    assert cache.verify(area="kyiv-north").area == "kyiv-north"


def test_a_cache_naming_no_area_is_the_wrong_area(cache, tmp_path):
    unnamed = another(cache, tmp_path, "unnamed", area(None))
    assert unnamed.reason(area="kyiv-north") == "wrong-area"
    old = another(cache, tmp_path, "old", None)  # a Manifest from before runtime.area
    assert old.reason(area="kyiv-north") == "wrong-area"
    assert old.verify().area is None


def test_a_malformed_area_is_a_bad_manifest(cache):
    sign(cache, {"name": 7, "bbox": NORTH, "zooms": [18], "sector_class": "stable_rear"})
    assert cache.reason() == "bad-manifest"


# ---------------------------------------------------------------- rollback per key and sector

def test_an_older_cache_of_the_same_key_and_sector_is_a_rollback(cache, tmp_path):
    sign(cache, area("kyiv-north"), issued_at=T0 + timedelta(minutes=30))
    cache.verify()
    older = another(cache, tmp_path, "rebuilt-earlier", area("kyiv-north"), issued_at=T0)
    assert older.reason() == "rollback"  # a new cache id does not start the sector afresh
    newer = another(cache, tmp_path, "rebuilt-later", area("kyiv-north"),
                    issued_at=T0 + timedelta(minutes=45))
    assert newer.verify().first_use is True
    assert cache.reason() == "rollback"  # and now the first one is the older


def test_other_sectors_and_other_keys_do_not_interfere(cache, tmp_path):
    sign(cache, area("kyiv-north"), issued_at=T0 + timedelta(minutes=30))
    cache.verify()
    south = another(cache, tmp_path, "south", area("kyiv-south", SOUTH), issued_at=T0)
    assert south.verify().version == 1
    other_key = another(cache, tmp_path, "other-key", area("kyiv-north"), same_key=False,
                        issued_at=T0)
    assert other_key.verify().version == 1
    sectors = state(cache)["sectors"]
    assert set(sectors) == {keyid(cache.key), keyid(other_key.key)}
    assert set(sectors[keyid(cache.key)]) == {"name:kyiv-north", "name:kyiv-south"}


def test_unnamed_areas_are_told_apart_by_their_ground(cache, tmp_path):
    first = another(cache, tmp_path, "a", area(None), issued_at=T0 + timedelta(minutes=30))
    first.verify()
    assert another(cache, tmp_path, "b", area(None, SOUTH), issued_at=T0).verify().version == 1
    assert another(cache, tmp_path, "c", area(None), issued_at=T0).reason() == "rollback"


def test_a_manifest_without_an_area_keeps_only_the_per_cache_floor(cache, tmp_path):
    """Caches signed before runtime.area cannot say their sector: they are ordered by version
    within their cache id only, as before."""
    first = another(cache, tmp_path, "a", None, issued_at=T0 + timedelta(minutes=30))
    first.verify()
    assert another(cache, tmp_path, "b", None, issued_at=T0).verify().version == 1


# ---------------------------------------------------------------- the state file

def test_a_format_1_state_file_still_loads_and_still_protects(cache):
    payload = (cache.root / "Manifest.json").read_bytes()
    cache.state.parent.mkdir(parents=True)
    old = {"format": 1, "caches": {"sector-7": {
        "version": 1, "manifest_blake3": blake3.blake3(payload).hexdigest(),
        "keyid": keyid(cache.key), "expires": "2026-03-08T12:00:00Z"}}}
    cache.state.write_text(json.dumps(old, sort_keys=True, indent=1) + "\n")
    result = cache.verify()
    assert result.first_use is False and result.state_updated
    now = state(cache)
    assert now["format"] == STATE_FORMAT == 2
    assert now["caches"]["sector-7"] == old["caches"]["sector-7"]  # carried over as it was
    assert now["sectors"][keyid(cache.key)]["name:kyiv-north"]["cache_id"] == "sector-7"
    old["caches"]["sector-7"]["version"] = 5
    cache.state.write_text(json.dumps(old))
    assert cache.reason() == "rollback"


def test_a_state_file_with_only_caches_loads(cache):
    cache.state.parent.mkdir(parents=True)
    cache.state.write_text('{"caches": {}}')
    assert cache.verify().first_use is True


@pytest.mark.parametrize("text", [
    '{"format": 3, "caches": {}}',  # a newer c10's: never half-understood
    '{"format": 2, "caches": {}, "caches": {}}',  # duplicate keys: two readers, two states
    '{"format": 2, "caches": {}, "time_floor": {"verified_at": "yesterday"}}',
    '{"format": 2, "caches": {}, "sectors": {"k": {"name:x": {"issued_at": 1}}}}',
    "[" * 100_000 + "]" * 100_000,
])
def test_a_state_file_it_cannot_read_fails_closed(cache, text):
    cache.state.parent.mkdir(parents=True)
    cache.state.write_text(text)
    assert cache.reason() == "bad-state"
