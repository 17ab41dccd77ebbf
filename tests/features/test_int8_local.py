"""INT8 local-feature engines: the match-retention gate on real onnxruntime (and NNCF), with the
demo's seeded local model and matcher at a small size, and one that quantizes badly on
purpose."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from test_int8 import BACKENDS  # each backend's INT8 engine (OpenVINO's needs NNCF)
from tiny_models import file_hash

from c10.errors import EngineBuildError
from c10.features import int8_local
from c10.features.backends.onnxruntime import OnnxRuntimeBackend
from c10.features.engines import EngineSpec, build_engine, engine_key, load_engine, sidecar_path
from c10.tools import netgen, synth

pytestmark = pytest.mark.timeout(120)
SIZE, K, DIM = 64, 32, 16
PREP = ((SIZE, SIZE), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "rgb", "bilinear", "full")


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("tiles")
    ids = synth.make_tiles(d, (50.43, 30.49, 50.47, 30.56), (15,), size=SIZE)[:20]
    return [str(d / str(z) / str(x) / f"{y}.jpg") for z, x, y in ids]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("models")
    local = netgen.write_local_model(d / "local.onnx", input_size=SIZE, keypoints=K,
                                     desc_dim=DIM)
    return {"local": local, "bad": outlier_local(local, d / "bad.onnx"),
            "matcher": netgen.write_matcher_model(d / "matcher.onnx", keypoints=K, desc_dim=DIM)}


def outlier_local(good, path):
    """The local model with one channel of its descriptor branch's first activation 10^4 times
    the others and the next conv cancelling that scale: the same fp32 features, but a
    per-tensor uint8 activation rounds the other channels, and the descriptors, away."""
    model = onnx.load(str(good))
    convs = [n for n in model.graph.node if n.op_type == "Conv" and n.input[0] == "image"]
    first = convs[-1]  # the descriptor branch's stem (the score branch's comes first)
    second = next(n for n in model.graph.node
                  if n.op_type == "Conv" and n.input[0] != "image"
                  and n.input[0] in {m.output[0] for m in model.graph.node
                                     if m.op_type == "Relu" and m.input[0] == first.output[0]})
    weights = {i.name: i for i in model.graph.initializer}
    for name, scale in ((first.input[1], 1e4), (second.input[1], 1e-4)):
        w = numpy_helper.to_array(weights[name]).copy()
        if scale > 1:
            w[0] *= scale
        else:
            w[:, 0] *= scale
        weights[name].CopyFrom(numpy_helper.from_array(w, name))
    onnx.save(model, str(path))
    return path


def local_spec(path, tiles, matcher=None, **kw) -> EngineSpec:
    kw = {"precision": "int8", "calibration_hash": "tiles:a", "preprocess": PREP,
          "calibration_tiles": tuple(tiles[:10]), "holdout_tiles": tuple(tiles[10:]),
          "role": "local", "gate_matcher": str(matcher) if matcher else None,
          "batch": (1, 1, 1)} | kw
    return EngineSpec(model="local", onnx_path=path, onnx_hash=file_hash(path),
                      input_shape=(3, SIZE, SIZE), **kw)


def test_shifted_view_moves_the_tile_by_the_stated_motion():
    tensor = np.random.default_rng(0).standard_normal((3, 64, 48)).astype(np.float32)
    moved, (dx, dy) = int8_local.shifted(tensor)
    assert (dx, dy) == (6, 4)
    assert np.array_equal(moved[:, dy:, dx:], tensor[:, :-dy, :-dx])
    assert np.array_equal(moved[:, :dy, dx:], np.broadcast_to(tensor[:, :1, :-dx], (3, dy, 42)))


@pytest.mark.parametrize("make", BACKENDS)
def test_a_local_model_that_quantizes_well_passes_and_records_its_retention(
        tmp_path, models, tiles, make):
    backend = make()
    spec = local_spec(models["local"], tiles, models["matcher"])
    path, built = build_engine(spec, backend, tmp_path / "engines")
    assert built
    info = json.loads(sidecar_path(path).read_text())["build"]
    gate = info["int8_gate"]
    assert gate["pairing"] == "lightglue" and gate["pairs"] == 10
    assert gate["matcher_blake3"] == file_hash(models["matcher"])
    assert gate["correct_fp32"] > 5 * gate["pairs"]  # the shifted views do match at fp32
    assert gate["match_retention"] >= spec.int8_min_match_retention, gate
    assert gate["match_retention"] == round(gate["correct_int8"] / gate["correct_fp32"], 6)
    out = dict(zip(*(lambda r: (r.output_names, r.run({r.input_names[0]: np.zeros(
        (1, 3, SIZE, SIZE), np.float32)})))(load_engine(path, spec, backend))))
    assert out["descriptors"].shape == (1, K, DIM)
    # reused while the recorded retention meets the threshold, refused (named) when it does not
    assert build_engine(spec, backend, tmp_path / "engines") == (path, False)
    above = gate["match_retention"] + 0.001
    with pytest.raises(EngineBuildError, match=f"int8_min_match_retention = {above}"):
        build_engine(replace(spec, int8_min_match_retention=above), backend, tmp_path / "engines")


@pytest.mark.parametrize("make", BACKENDS)
def test_the_gate_refuses_a_local_model_that_quantizes_badly(tmp_path, models, tiles, make):
    spec = local_spec(models["bad"], tiles, models["matcher"])
    engines = tmp_path / "engines"
    with pytest.raises(EngineBuildError) as err:
        build_engine(spec, make(), engines)
    text = str(err.value)
    assert "keeps 0." in text and "correct lightglue matches" in text, text
    assert "models.local.int8_min_match_retention = 0.85" in text
    assert 'models.local.precision = "fp32"' in text
    assert not list(engines.glob("local-*"))  # nothing refused is left to load


def test_without_a_matcher_the_gate_pairs_mutual_nearest_descriptors(tmp_path, models, tiles):
    good, bad = (local_spec(models[m], tiles) for m in ("local", "bad"))
    path, _ = build_engine(good, OnnxRuntimeBackend(), tmp_path / "engines")
    gate = json.loads(sidecar_path(path).read_text())["build"]["int8_gate"]
    assert gate["pairing"] == "mnn" and gate["matcher_blake3"] is None
    assert gate["match_retention"] >= good.int8_min_match_retention, gate
    with pytest.raises(EngineBuildError, match="correct mnn matches"):
        build_engine(bad, OnnxRuntimeBackend(), tmp_path / "engines")


def test_the_gates_threshold_and_matcher_are_not_in_the_engine_key(models, tiles):
    # they decide the gate, not the engine's bytes (the task's key holds the threshold)
    backend = OnnxRuntimeBackend()
    spec = local_spec(models["local"], tiles, models["matcher"])
    assert engine_key(replace(spec, int8_min_match_retention=0.5, gate_matcher=None),
                      backend) == engine_key(spec, backend)
    assert engine_key(replace(spec, calibration_hash="tiles:b"), backend) \
        != engine_key(spec, backend)
