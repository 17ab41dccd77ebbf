"""An INT8 cache on ONNX Runtime goes through build, verify and incremental builds like any other:
a new tile outside the calibration sample does not recalibrate, a changed sample tile does."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import build, built, executed, make_cache, plan_of

from c10.cli import main as c10_main
from c10.features.engines import load_signed_engine
from c10.features.int8 import rank_tiles

pytestmark = pytest.mark.timeout(240)


def int8_cache(cache):
    toml = cache / "c10.toml"
    toml.write_text(toml.read_text().replace(
        'precision = "fp32"', 'precision = "int8"\ncalibration_tiles = 8\nholdout_tiles = 8', 1))
    return cache


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_int8_cache_builds_verifies_and_keeps_its_calibration(backend, inputs, capsys,
                                                              operator_key, tmp_path):
    if backend == "openvino":
        pytest.importorskip("nncf")
    cache = int8_cache(make_cache(tmp_path / "cache", inputs, operator_key, backend=backend))
    ranked = rank_tiles(plan_of(cache).tiles, 10 ** 6)
    sample, late = ranked[:8], ranked[-1]  # `late` ranks after every sampled tile
    shutil.move(cache / late.path, tmp_path / "late.jpg")
    assert "engines:global" in executed(built(cache, capsys))
    plan = plan_of(cache).plans["global"]
    assert plan.spec.calibration_tiles == tuple(str(cache / t.path) for t in sample)
    sidecar = json.loads((cache / plan.sidecar_rel).read_text())
    gate = sidecar["build"]["int8_gate"]
    assert gate["min_cosine"] >= 0.99 and gate["recall_at_1_drop"] <= 0.01, gate
    manifest = json.loads((cache / "Manifest.json").read_text())
    listed = {f["path"] for f in manifest["files"]}
    assert {plan.engine_rel, plan.sidecar_rel} <= listed
    state = ["--state", str(tmp_path / "state.json")]
    assert c10_main(["verify", str(cache), "--trusted-keys", str(operator_key[1]), *state]) == 0
    # the aircraft loads it from the signed bytes alone, as any engine
    runner = load_signed_engine("global", (cache / plan.engine_rel).read_bytes(),
                                (cache / plan.sidecar_rel).read_bytes(), plan.engine_key,
                                plan.backend)
    assert runner(np.zeros((2, 3, 64, 64), np.float32)).shape == (2, 64)

    # +1 tile outside the sample: its block is embedded, the engine stays
    (cache / late.path).parent.mkdir(parents=True, exist_ok=True)
    shutil.move(tmp_path / "late.jpg", cache / late.path)
    ran = executed(built(cache, capsys))
    assert "engines:global" not in ran and any(t.startswith("shards:") for t in ran)
    assert plan_of(cache).plans["global"].engine_key == plan.engine_key
    assert c10_main(["verify", str(cache), "--trusted-keys", str(operator_key[1]), *state]) == 0

    # a sampled tile's bytes change: the sample changes, so the engine is recalibrated
    (cache / sample[0].path).write_bytes((cache / late.path).read_bytes())
    code, out = build(cache, capsys)
    assert "engines:global" in executed(out)
    assert code != 0 and "doit prune" in out  # the old engine waits for `doit prune`, as designed
    assert plan_of(cache).plans["global"].engine_key != plan.engine_key
    assert build(cache, capsys, "prune", "--apply")[0] == 0
    built(cache, capsys)
    assert c10_main(["verify", str(cache), "--trusted-keys", str(operator_key[1]), *state]) == 0
