"""`doit prune`: stale engines listed, removed only with --apply, unknown files never touched."""
from __future__ import annotations

import re

from conftest import executed

from c10.rules.driver import run_build


def run(root, capsys, *args):
    code = run_build(root, list(args))
    out = capsys.readouterr()
    return code, out.out + out.err


def test_prune_lists_then_removes_only_stale_engines(cache, capsys):
    assert run(cache, capsys, "build_cache")[0] == 0
    stale = cache / "engines" / ("global-" + "ab" * 32 + ".onnx")
    stale.write_bytes(b"old engine")
    mine = cache / "engines" / "notes.txt"
    mine.write_text("operator's notes")
    code, out = run(cache, capsys, "build_cache")
    assert code != 0 and "doit prune" in out and stale.name in out

    code, out = run(cache, capsys, "prune")
    assert (code == 0 and f"stale engines/{stale.name}" in out
            and "left alone: engines/notes.txt" in out)
    assert stale.exists()

    code, out = run(cache, capsys, "prune", "--apply")
    assert code == 0 and not stale.exists() and mine.read_text() == "operator's notes"
    assert all((cache / rel).exists() for rel in re.findall(r"engines/\S+", out) if "notes" in rel)
    mine.unlink()
    code, out = run(cache, capsys, "build_cache")
    assert code == 0 and executed(out) == ["coverage"]
