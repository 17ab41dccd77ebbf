"""An INT8 local-feature model in a cache on ONNX Runtime: gated by the matches the cache's
matcher keeps, its figure signed with its sidecar, its threshold part of its task's key."""
from __future__ import annotations

import json

import pytest
from conftest import build, built, executed, make_cache, plan_of

from c10.cli import main as c10_main
from c10.errors import EngineBuildError
from c10.tools import netgen

pytestmark = pytest.mark.timeout(240)
K, DIM = 32, 16
TABLES = '''
[models.local]
path = "models/local.onnx"
role = "local"
input_size = [64, 64]
precision = "int8"
calibration_tiles = 8
holdout_tiles = 8
{extra}
[models.matcher]
path = "models/matcher.onnx"
role = "matcher"
input_size = []

'''


def with_local(root, extra: str = "", matcher: bool = True):
    netgen.write_local_model(root / "models" / "local.onnx", input_size=64, keypoints=K,
                             desc_dim=DIM)
    netgen.write_matcher_model(root / "models" / "matcher.onnx", keypoints=K, desc_dim=DIM)
    tables = TABLES.format(extra=extra)
    if not matcher:
        tables = tables.split("[models.matcher]")[0]
    text = (root / "c10.toml").read_text()
    (root / "c10.toml").write_text(text.replace("[shards]", tables.lstrip() + "[shards]"))
    return root


def set_retention(root, value) -> None:
    toml = root / "c10.toml"
    lines = [ln for ln in toml.read_text().splitlines()
             if not ln.startswith("int8_min_match_retention")]
    at = lines.index("holdout_tiles = 8") + 1
    toml.write_text("\n".join(lines[:at] + [f"int8_min_match_retention = {value}"]
                              + lines[at:]) + "\n")


def test_int8_local_cache_is_gated_signed_and_keyed_by_its_threshold(
        inputs, operator_key, capsys, tmp_path):
    cache = with_local(make_cache(tmp_path / "cache", inputs, operator_key))
    set_retention(cache, 0.5)  # the tiny demo model on 8 tiles: a noisy figure (~0.8)
    plan = plan_of(cache).plans["local"]
    assert plan.spec.gate_matcher == str(cache / "models" / "matcher.onnx")
    assert "engines:local" in executed(built(cache, capsys))
    sidecar = json.loads((cache / plan.sidecar_rel).read_text())
    gate = sidecar["build"]["int8_gate"]
    assert gate["pairing"] == "lightglue" and gate["pairs"] == 8
    assert gate["match_retention"] >= 0.5 and gate["correct_fp32"] > 4 * 8, gate
    manifest = json.loads((cache / "Manifest.json").read_text())
    assert {plan.engine_rel, plan.sidecar_rel} <= {f["path"] for f in manifest["files"]}
    request = manifest["request"]["models"]
    assert request["local"]["int8_min_match_retention"] == 0.5
    assert "int8_min_match_retention" not in request["global"]
    state = ["--state", str(tmp_path / "state.json")]
    assert c10_main(["verify", str(cache), "--trusted-keys", str(operator_key[1]), *state]) == 0

    # a new threshold the recorded figure meets: the task reruns, the engine is kept
    set_retention(cache, 0.4)
    ran = executed(built(cache, capsys))
    assert "engines:local" in ran and plan_of(cache).plans["local"].engine_key == plan.engine_key
    assert json.loads((cache / plan.sidecar_rel).read_text()) == sidecar
    # one it does not meet: refused with the figure and the setting that falls back
    set_retention(cache, 1.0 if gate["match_retention"] < 1 else 0.9999999)
    code, out = build(cache, capsys)
    assert code != 0 and "engines:local" in executed(out)
    assert f"keeps {gate['match_retention']:.4f}" in out and "int8_min_match_retention" in out
    assert 'models.local.precision = "fp32"' in out


def test_int8_on_a_matcher_is_refused_when_the_graph_loads(inputs, operator_key, tmp_path):
    cache = with_local(make_cache(tmp_path / "cache", inputs, operator_key))
    toml = cache / "c10.toml"
    toml.write_text(toml.read_text().replace('input_size = []\n',
                                             'input_size = []\nprecision = "int8"\n'))
    with pytest.raises(EngineBuildError, match="only for global and local models.*'matcher'"):
        plan_of(cache)


def test_without_a_matcher_the_local_gate_pairs_mutual_nearest(inputs, operator_key, tmp_path):
    cache = with_local(make_cache(tmp_path / "cache", inputs, operator_key), matcher=False)
    assert plan_of(cache).plans["local"].spec.gate_matcher is None
