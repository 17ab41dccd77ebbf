"""The file_dep checker: a tile's stat is taken once per run however many tasks list it."""
from __future__ import annotations

import os

from c10.rules.checker import Blake3Checker


def test_a_tile_is_stated_once_per_run_and_any_other_file_each_time(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiles/15/1").mkdir(parents=True)
    (tmp_path / ".c10/refs").mkdir(parents=True)
    tile, ref = "tiles/15/1/2.jpg", ".c10/refs/a.ref"
    for rel in (tile, ref):
        (tmp_path / rel).write_bytes(b"one")
    checker = Blake3Checker()
    first_tile, first_ref = checker.info(tile), checker.info(ref)
    for rel in (tile, ref):  # a task of this run rewrites the ref; tiles are never written
        (tmp_path / rel).write_bytes(b"longer")
    assert checker.info(tile) is first_tile  # the second task listing it: no second stat
    assert checker.info(ref).st_size == 6 != first_ref.st_size
    assert Blake3Checker().info(tile).st_size == 6  # the next run sees the change
    os.unlink(tile)
    fresh = Blake3Checker()
    try:
        fresh.info(tile)
        raise AssertionError("a missing tile must raise, as os.stat does")
    except fresh.CheckerError:
        pass
