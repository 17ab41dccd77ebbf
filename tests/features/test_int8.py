"""INT8 engines on ONNX Runtime: real static quantization, its key, its calibration file and its
accuracy gate (tiny models, real onnxruntime)."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import pytest
from conftest import rewrite
from onnx import TensorProto, helper, numpy_helper
from tiny_models import IR_VERSION, file_hash, spec_for, tiny_cnn

from c10.errors import CalibrationCacheError, EngineBuildError
from c10.features import int8
from c10.features.backends.onnxruntime import OnnxRuntimeBackend
from c10.features.backends.openvino import OpenVinoBackend
from c10.features.engines import build_engine, engine_key, key_material, load_engine, sidecar_path
from c10.features.preprocess import Preprocessing, load_tensor
from c10.tools import synth

pytestmark = pytest.mark.timeout(120)
PREP = ((32, 32), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "rgb", "bilinear", "full")


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> list[str]:
    """24 synthetic aerial tiles (what a cache holds), as paths."""
    d = tmp_path_factory.mktemp("tiles")
    ids = synth.make_tiles(d, (50.43, 30.49, 50.47, 30.56), (15,), size=64)[:24]
    return [str(d / str(z) / str(x) / f"{y}.jpg") for z, x, y in ids]


def int8_spec(path, tiles, **kw):
    kw = {"precision": "int8", "calibration_hash": "tiles:a", "preprocess": PREP,
          "calibration_tiles": tuple(tiles[:12]), "holdout_tiles": tuple(tiles[12:])} | kw
    return spec_for(path, **kw)


def outlier_cnn(path):
    """A CNN that quantizes badly on purpose: one channel of its first activation is 10^4 times
    the others, and the next conv cancels that scale, so the output rests on the small channels
    that a per-tensor uint8 activation rounds away."""
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    w0[0] *= 1e4
    w1 = rng.standard_normal((16, 8, 1, 1)).astype(np.float32)
    w1[:, 0] *= 1e-4
    proj = rng.standard_normal((16, 16)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["image", "w0"], ["c0"], kernel_shape=[3, 3],
                              pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("Conv", ["r0", "w1"], ["c1"], kernel_shape=[1, 1]),
             helper.make_node("GlobalAveragePool", ["c1"], ["pool"]),
             helper.make_node("Flatten", ["pool"], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "proj"], ["descriptor"])]
    graph = helper.make_graph(
        nodes, "outlier",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("descriptor", TensorProto.FLOAT, ["batch", 16])],
        [numpy_helper.from_array(w0, "w0"), numpy_helper.from_array(w1, "w1"),
         numpy_helper.from_array(proj, "proj")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              ir_version=IR_VERSION)
    onnx.save(model, str(path))
    return path


def test_key_follows_the_sample_and_the_quantizer(onnx_file, tiles, monkeypatch):
    backend = OnnxRuntimeBackend()
    spec = int8_spec(onnx_file, tiles)
    key = engine_key(spec, backend)
    assert key_material(spec, backend)["quantizer"]["version"] == backend.version()
    assert "quantizer" not in key_material(replace(spec, precision="fp32"), backend)
    assert engine_key(replace(spec, calibration_hash="tiles:b"), backend) != key
    # the held-out tiles and the thresholds decide the gate, not the engine's bytes
    assert engine_key(replace(spec, holdout_tiles=(), int8_min_cosine=0.5), backend) == key
    monkeypatch.setitem(int8.QUANTIZER, "per_channel", False)
    assert engine_key(spec, backend) != key


def test_plan_sample_is_deterministic_and_keyed_by_tile_bytes(tmp_path, tiles):
    from c10.config import Model
    from c10.store.tiles import Tile

    root = tmp_path / "c"
    all_tiles = []
    for i, src in enumerate(tiles):
        rel = f"tiles/15/{i}/0.jpg"
        (root / rel).parent.mkdir(parents=True)
        (root / rel).write_bytes(open(src, "rb").read())
        all_tiles.append(Tile(15, i, 0, rel))
    model = Model("global", root / "m.onnx", input_size=(32, 32), calibration_tiles=4,
                  holdout_tiles=4)
    first = int8.plan_sample(root, model, all_tiles, None)
    assert int8.plan_sample(root, model, all_tiles[::-1], None) == first
    assert len(first["calibration_tiles"]) == len(first["holdout_tiles"]) == 4
    assert not set(first["calibration_tiles"]) & set(first["holdout_tiles"])
    sampled = next(t for t in all_tiles if str(root / t.path) == first["calibration_tiles"][0])
    rewrite((root / sampled.path), open(tiles[-1], "rb").read())
    assert int8.plan_sample(root, model, all_tiles, None)["calibration_hash"] \
        != first["calibration_hash"]
    # a calibration file: its hash is the sample, no tile is calibrated on
    given = int8.plan_sample(root, model, all_tiles, "f" * 64)
    assert (given["calibration_hash"], given["calibration_tiles"]) == ("f" * 64, ())


def openvino_int8():
    pytest.importorskip("nncf")
    return OpenVinoBackend()


BACKENDS = [pytest.param(OnnxRuntimeBackend, id="onnxruntime"),
            pytest.param(openvino_int8, id="openvino")]


@pytest.mark.parametrize("make", BACKENDS)
def test_int8_engine_is_built_and_records_its_gate(tmp_path, onnx_file, tiles, make):
    backend = make()
    spec = int8_spec(onnx_file, tiles)
    path, built = build_engine(spec, backend, tmp_path / "engines")
    assert built
    info = json.loads(sidecar_path(path).read_text())["build"]
    gate = info["int8_gate"]
    assert gate["samples"] == 12 and gate["holdout"] == "held-out tiles"
    assert gate["min_cosine"] >= 0.99 and gate["recall_at_1_drop"] <= 0.01
    assert info["calibration_samples"] == 12
    assert {**info["quantizer"], "version": info["quantizer_version"]} == backend.quantizer()
    if backend.name == "onnxruntime":
        ops = {n.op_type for n in onnx.load(str(path)).graph.node}
        assert ops & {"QLinearConv", "QuantizeLinear", "DequantizeLinear"}, ops
    got = load_engine(path, spec, backend)(np.zeros((3, 3, 32, 32), np.float32))
    assert got.shape == (3, 16)
    # reused as long as the recorded figures meet the thresholds; refused when they no longer do
    assert build_engine(spec, backend, tmp_path / "engines") == (path, False)
    with pytest.raises(EngineBuildError, match="int8_min_cosine = 1.0"):
        build_engine(replace(spec, int8_min_cosine=1.0), backend, tmp_path / "engines")


@pytest.mark.parametrize("make", BACKENDS)
def test_gate_refuses_a_model_that_quantizes_badly(tmp_path, tiles, make):
    bad = outlier_cnn(tmp_path / "outlier.onnx")
    spec = replace(int8_spec(bad, tiles), onnx_hash=file_hash(bad))
    engines = tmp_path / "engines"
    with pytest.raises(EngineBuildError) as err:
        build_engine(spec, make(), engines)
    text = str(err.value)
    assert "accuracy gate" in text and "min cosine 0." in text
    assert "models.global.int8_min_cosine = 0.99" in text
    assert 'models.global.precision = "fp32"' in text
    assert not list(engines.glob("global-*"))  # nothing refused is left to load


def test_calibration_file_is_used_when_given(tmp_path, onnx_file, tiles):
    prep = Preprocessing(*PREP)
    tensors = np.stack([load_tensor(t, prep) for t in tiles[:5]])
    npy = tmp_path / "calib.npy"
    np.save(npy, tensors)
    spec = int8_spec(onnx_file, tiles, calibration_path=npy, calibration_hash=file_hash(npy),
                     calibration_tiles=())
    path, _ = build_engine(spec, OnnxRuntimeBackend(), tmp_path / "engines")
    assert json.loads(sidecar_path(path).read_text())["build"]["calibration_samples"] == 5
    np.save(npy, tensors[:, :, :16])  # not the model's input
    spec = replace(spec, calibration_hash=file_hash(npy))
    with pytest.raises(CalibrationCacheError, match=r"\[N >= 1, 3, 32, 32\]"):
        build_engine(spec, OnnxRuntimeBackend(), tmp_path / "engines")
    npy.write_bytes(b"TRT-100300-EntropyCalibration2\nimage: 3c010a14\n")
    with pytest.raises(CalibrationCacheError, match="not a NumPy .npy"):
        int8.check_npy(npy, "global")


def test_a_cnn_of_the_tests_passes_its_gate_on_its_calibration_tensors(tmp_path, tiles):
    # no held-out tiles (an engine built outside a cache): gated on what it calibrated on
    model = tiny_cnn(tmp_path / "m.onnx", seed=3)
    spec = replace(int8_spec(model, tiles, holdout_tiles=()), onnx_hash=file_hash(model))
    path, _ = build_engine(spec, OnnxRuntimeBackend(), tmp_path / "engines")
    gate = json.loads(sidecar_path(path).read_text())["build"]["int8_gate"]
    assert gate["holdout"] == "calibration tensors" and gate["samples"] == 12


@pytest.mark.parametrize("key, value", [("calibration_tiles", 0), ("holdout_tiles", 1.5),
                                        ("int8_min_cosine", 2), ("int8_max_recall_drop", -0.1)])
def test_int8_settings_are_checked_where_c10_toml_is_parsed(key, value, tmp_path):
    from c10.config import parse_config
    from c10.errors import ConfigError

    data = {"area": {"bbox": [50.43, 30.49, 50.47, 30.56], "zooms": [15]},
            "models": {"global": {"path": "m.onnx", key: value}}}
    with pytest.raises(ConfigError, match=f"models.global.{key}"):
        parse_config(data, tmp_path)
    del data["models"]["global"][key]
    model = parse_config(data, tmp_path).models["global"]
    assert (model.calibration_tiles, model.holdout_tiles) == (128, 128)
    assert (model.int8_min_cosine, model.int8_max_recall_drop) == (0.99, 0.01)
