"""Engines inside the doit graph: identity decides rebuilds, a path change does not, stale ones
wait for prune."""
from __future__ import annotations

import json
import re

from conftest import current_files, executed

from c10.rules.driver import run_build
from c10.tools import netgen


def run(root, capsys, *args):
    code = run_build(root, list(args) or ["build_cache"])
    out = capsys.readouterr()
    return code, out.out + out.err


def engines(root):
    return sorted(p.name for p in (root / "engines").iterdir())


def test_renaming_the_onnx_reuses_engine_and_shards(cache, capsys):
    assert run(cache, capsys)[0] == 0
    before = engines(cache)
    (cache / "models/global.onnx").rename(cache / "models/renamed.onnx")
    toml = cache / "c10.toml"
    toml.write_text(toml.read_text().replace("models/global.onnx", "models/renamed.onnx"))
    code, out = run(cache, capsys)
    assert code == 0, out
    # the engines task re-checks (its file_dep moved) but the key is the same: nothing re-embedded
    assert not [t for t in executed(out) if t.startswith(("shards:", "index:"))]
    assert engines(cache) == before


def test_new_weights_give_a_new_engine_and_reembed(cache, capsys):
    assert run(cache, capsys)[0] == 0
    old = engines(cache)
    netgen.write_global_model(cache / "models/global.onnx", input_size=64, dim=64, seed=7)
    code, out = run(cache, capsys)
    ran = executed(out)
    assert "engines:global" in ran and "index:global" in ran
    assert len([t for t in ran if t.startswith("shards:")]) == len(current_files(cache, "shards"))
    # the old engine is not deleted by a build: the gate names it and the command that removes it
    assert code != 0 and "doit prune" in out and old[0] in out
    assert run(cache, capsys, "prune", "--apply")[0] == 0
    code, out = run(cache, capsys)
    assert code == 0 and executed(out) == ["coverage", "manifest"]
    assert set(engines(cache)).isdisjoint(old)


def test_workspace_change_is_a_new_key(cache, capsys):
    assert run(cache, capsys)[0] == 0
    sidecar = next(p for p in (cache / "engines").iterdir() if p.suffix == ".json")
    toml = cache / "c10.toml"
    toml.write_text(re.sub(r"workspace_mb = \d+", "workspace_mb = 2048", toml.read_text()))
    code, out = run(cache, capsys)
    assert "engines:global" in executed(out)
    new = [p for p in (cache / "engines").iterdir() if p.suffix == ".json" and p != sidecar]
    assert len(new) == 1 and json.loads(new[0].read_text())["material"]["workspace_mb"] == 2048
