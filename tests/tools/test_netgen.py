"""Generated ONNX networks: valid, deterministic, right shapes, and actually useful."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from c10.query.views import perturb
from c10.tools import netgen, synth

SIZE = 224


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return netgen.write_demo_models(tmp_path_factory.mktemp("models"))


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _batch(images, size=SIZE):
    arr = np.stack([np.asarray(im.convert("RGB").resize((size, size)), dtype=np.float32) / 255
                    for im in images])
    arr = (arr - np.array(netgen.MEAN, np.float32)) / np.array(netgen.STD, np.float32)
    return np.ascontiguousarray(arr.transpose(0, 3, 1, 2))


def test_demo_models_are_valid_ir10(models):
    assert sorted(models) == ["global", "local", "matcher"]
    for name, path in models.items():
        assert path.name == f"{name}.onnx"
        model = onnx.load(path)
        onnx.checker.check_model(model)
        assert model.ir_version == 10
        assert [o.version for o in model.opset_import] == [netgen.OPSET]


def test_generation_is_byte_deterministic(models, tmp_path):
    again = netgen.write_demo_models(tmp_path)
    for name in models:
        assert models[name].read_bytes() == again[name].read_bytes()
    other = netgen.write_global_model(tmp_path / "g.onnx", seed=5)
    assert other.read_bytes() != models["global"].read_bytes()


def test_global_descriptor_unit_norm_and_dynamic_batch(models):
    sess = _session(models["global"])
    x = _batch([synth.render_tile(16, 38300 + i, 22000) for i in range(5)])
    (five,) = sess.run(None, {"image": x})
    assert five.shape == (5, 256) and five.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(five, axis=1), 1.0, atol=1e-5)
    for i in (0, 4):
        (one,) = sess.run(None, {"image": x[i:i + 1]})
        np.testing.assert_allclose(one[0], five[i], atol=1e-5)


def test_global_retrieval_recall(models):
    sess = _session(models["global"])
    ids = synth.tile_ids((50.43, 30.48, 50.47, 30.56), [16])[:100]
    tiles = [synth.render_tile(*t) for t in ids]
    rng = np.random.default_rng(0)
    queries = [perturb(t, rng, "mild") for t in tiles]

    def embed(imgs):
        return np.concatenate([sess.run(None, {"image": _batch(imgs[i:i + 25])})[0]
                               for i in range(0, len(imgs), 25)])

    db, q = embed(tiles), embed(queries)
    recall = np.mean((q @ db.T).argmax(axis=1) == np.arange(len(ids)))
    assert len(ids) == 100 and recall >= 0.9


def test_global_runs_in_openvino_like_onnxruntime(models):
    import importlib.util

    if importlib.util.find_spec("openvino") is None:  # importorskip would import it unguarded
        pytest.skip("openvino is not installed")
    from c10.features.backends.openvino import import_openvino

    ov = import_openvino()
    x = _batch([synth.render_tile(16, 38300 + i, 22000) for i in range(2)])
    (ref,) = _session(models["global"]).run(None, {"image": x})
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(models["global"])), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32"})
    got = compiled(x)[compiled.output(0)]
    assert got.shape == ref.shape
    assert np.min(np.sum(got * ref, axis=1)) >= 0.999


def test_local_model_outputs(models):
    x = _batch([synth.render_tile(16, 38300, 22000)], size=256)
    kp, desc, scores = _session(models["local"]).run(["keypoints", "descriptors", "scores"],
                                                     {"image": x})
    assert kp.shape == (1, 256, 2) and desc.shape == (1, 256, 64) and scores.shape == (1, 256)
    assert kp.min() >= 0 and kp.max() < 256
    assert len({tuple(p) for p in kp[0]}) == 256  # non-maximum suppression: distinct points
    np.testing.assert_allclose(np.linalg.norm(desc[0], axis=1), 1.0, atol=1e-5)


def test_matcher_matches_a_set_with_itself_and_a_permutation(models):
    sess = _session(models["matcher"])
    d = np.random.default_rng(0).standard_normal((1, 256, 64)).astype(np.float32)
    d /= np.linalg.norm(d, axis=2, keepdims=True)
    matches, scores = sess.run(None, {"desc0": d, "desc1": d})
    assert matches.dtype == np.int64 and matches.shape == (1, 256) and scores.shape == (1, 256)
    assert np.mean(matches[0] == np.arange(256)) > 0.95
    perm = np.random.default_rng(1).permutation(256)
    matches, _ = sess.run(None, {"desc0": d, "desc1": d[:, perm]})
    assert np.mean(perm[matches[0]] == np.arange(256)) > 0.95


def test_matcher_rejects_unrelated_descriptors(models):
    rng = np.random.default_rng(2)
    d0, d1 = (rng.standard_normal((1, 256, 64)).astype(np.float32) for _ in range(2))
    matches, _ = _session(models["matcher"]).run(None, {"desc0": d0, "desc1": d1})
    assert np.mean(matches[0] >= 0) < 0.5
