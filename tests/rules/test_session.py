"""One run's state in one object: the collector comes back whatever happens, the hash cache forgets
files the cache no longer has, and a run leaves nothing behind in the process."""
from __future__ import annotations

import gc
import json

import pytest
from conftest import built

from c10.rules import session
from c10.rules.driver import run_build


def test_a_failed_plan_load_gives_the_collector_back(cache, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug while loading")

    monkeypatch.setattr(session, "load_plan", broken)
    build = session.Build(cache)
    with pytest.raises(RuntimeError):
        build.plan()
    assert gc.isenabled()


def test_a_run_ends_with_the_collector_on_and_no_build_left(cache, capsys):
    built(cache, capsys)
    assert gc.isenabled() and session.active() is None
    assert run_build(cache, ["list"]) == 0
    assert gc.isenabled() and session.active() is None


def test_the_hash_cache_forgets_tiles_that_are_gone(cache, capsys):
    built(cache, capsys)
    columns = cache / ".c10" / "tilehashes"
    before = {f: json.loads(f.read_bytes()) for f in columns.glob("*/*.json")}
    assert before and not (cache / ".c10" / "hashes-tiles.json").exists()
    gone = sorted(next(iter(before.values())))[0]
    (cache / gone).unlink()
    built(cache, capsys)
    after = {f: json.loads(f.read_bytes()) for f in columns.glob("*/*.json")}
    assert after.keys() == before.keys()
    assert {rel for v in after.values() for rel in v} == {rel for v in before.values()
                                                          for rel in v} - {gone}
