"""Backends: real OpenVINO runs, auto selection, cheap host probing, TensorRT key/selection logic.

TensorRT cannot be installed on these machines: its tests fake NVML's answers and never
pretend that the builder or the runner ran.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest
from tiny_models import images, reference, row_cosine, spec_for

from c10.errors import CalibrationCacheError, ConfigError, EngineBuildError, EngineMismatchError
from c10.features import backends
from c10.features.backends.onnxruntime import OnnxRuntimeBackend, ort_streams
from c10.features.backends.openvino import OpenVinoBackend
from c10.features.backends.tensorrt import TensorRTBackend
from c10.features.engines import build_engine, engine_key, get_backend, load_engine, sidecar_path

# --- OpenVINO (real runs) ------------------------------------------------------------------

@pytest.mark.parametrize("precision,recorded", [("fp32", "f32"), ("bf16", "bf16"), ("fp16", "f16")])
def test_openvino_engine_agrees_with_fp32_reference(tmp_path, onnx_file, precision, recorded):
    backend, spec = OpenVinoBackend(), spec_for(onnx_file, precision=precision, batch=(1, 4, 8))
    path, built = build_engine(spec, backend, tmp_path / "engines")
    assert built and path.suffix == ".blob"
    sidecar = json.loads(sidecar_path(path).read_text())
    assert sidecar["build"]["requested_precision"] == recorded
    # What runs is recorded: without avx512_fp16 this CPU runs an f16 request as bf16.
    assert sidecar["build"]["inference_precision"] in (recorded, "bf16", "f32")
    runner = load_engine(path, spec, backend)
    for n in (1, 5, 11):  # 11 > max batch 8: the runner splits it
        batch = images(n, seed=n)
        out = runner(batch)
        assert out.shape == (n, 16)
        assert row_cosine(out, reference(onnx_file, batch)).min() >= 0.999


@pytest.mark.parametrize("backend", [OnnxRuntimeBackend(), OpenVinoBackend()],
                         ids=["onnxruntime", "openvino"])
def test_streams_run_at_once_and_a_batch_split_over_them_is_the_whole(tmp_path, onnx_file, backend):
    """Embedding workers call run_stream from several threads; runner(batch) splits over the
    streams."""
    spec = spec_for(onnx_file, batch=(1, 8, 16))
    runner = load_engine(build_engine(spec, backend, tmp_path)[0], spec, backend)
    assert runner.streams == (ort_streams(os.cpu_count())[0] if backend.name == "onnxruntime"
                              else runner.streams) >= 1
    batches = [images(8, seed=s) for s in range(6)]
    alone = [runner.stream(b) for b in batches]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(runner.stream, batches))
    for a, t, b in zip(alone, together, batches):
        np.testing.assert_allclose(t, a, atol=1e-5)
        assert row_cosine(a, reference(onnx_file, b)).min() >= 0.999
    runner.streams = 3  # a split into three parts, whatever this host's core count
    np.testing.assert_allclose(runner(batches[0]), alone[0], atol=1e-5)


@pytest.mark.parametrize("cpus, want", [(1, (1, 1)), (2, (2, 1)), (8, (8, 1)), (12, (8, 2)),
                                        (64, (8, 8))])
def test_ort_runs_one_thread_per_stream_up_to_a_cap(cpus, want):
    assert ort_streams(cpus) == want


def test_openvino_reuses_and_rejects_another_cpu(tmp_path, onnx_file):
    spec = spec_for(onnx_file)
    path, _ = build_engine(spec, OpenVinoBackend(), tmp_path)
    assert build_engine(spec, OpenVinoBackend(), tmp_path) == (path, False)
    other = OpenVinoBackend()
    other.__dict__["_fingerprint"] = {**other.host_fingerprint(), "isa": ["avx2", "fma"]}
    with pytest.raises(EngineMismatchError) as err:
        load_engine(path, spec, other)
    assert '"isa":["avx2","fma"]' in str(err.value) and "avx512" in str(err.value)


def test_openvino_fingerprint_is_cpu_isa_and_version():
    fp = OpenVinoBackend().host_fingerprint()
    assert fp["openvino"] == OpenVinoBackend().version() and fp["cpu_model"]
    assert set(fp["isa"]) <= set(backends.cpu_info()["flags"])
    assert not {"fpu", "vme", "pse", "ht"} & set(fp["isa"])


def test_openvino_int8_refuses_a_tensorrt_calibration_cache(tmp_path, onnx_file):
    cache = tmp_path / "calib.cache"
    cache.write_text("TRT-100300-EntropyCalibration2\nimage: 3c010a14\n")
    spec = spec_for(onnx_file, precision="int8", calibration_path=cache, calibration_hash="0")
    with pytest.raises(CalibrationCacheError, match="models.global.calibration"):
        build_engine(spec, OpenVinoBackend(), tmp_path / "engines")


# --- selection -----------------------------------------------------------------------------

def test_auto_prefers_tensorrt_then_openvino_then_onnxruntime(monkeypatch):
    assert get_backend("auto").name == "openvino"  # this machine: no GPU, OpenVINO installed
    monkeypatch.setattr(TensorRTBackend, "available", lambda self: True)
    assert get_backend("auto").name == "tensorrt"
    monkeypatch.setattr(TensorRTBackend, "available", lambda self: False)
    monkeypatch.setattr(OpenVinoBackend, "available", lambda self: False)
    assert get_backend("auto").name == "onnxruntime"
    monkeypatch.setattr(OnnxRuntimeBackend, "available", lambda self: False)
    with pytest.raises(EngineBuildError, match="pip install"):
        get_backend("auto")


def test_explicit_unavailable_backend_says_how_to_install(monkeypatch):
    with pytest.raises(EngineBuildError) as err:
        get_backend("tensorrt")
    assert "pip install 'c10[tensorrt]'" in str(err.value) and "NVIDIA GPU" in str(err.value)
    monkeypatch.setattr(OpenVinoBackend, "available", lambda self: False)
    with pytest.raises(EngineBuildError, match="pip install openvino"):
        get_backend("openvino")


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="engines.backend"):
        get_backend("cuda")


def test_named_backends_are_shared_so_probing_happens_once():
    assert get_backend("onnxruntime") is get_backend("onnxruntime")
    assert (get_backend("openvino").suffix == ".blob"
            and get_backend("onnxruntime").suffix == ".onnx")


def test_graph_load_path_imports_no_heavy_library():
    code = ("import sys, time; t = time.perf_counter(); from pathlib import Path;"
            "from c10.features.engines import EngineSpec, get_backend, engine_path;"
            "b = get_backend('auto'); s = EngineSpec('g', Path('g.onnx'), '00', (3, 224, 224));"
            "engine_path(Path('e'), s, b); dt = time.perf_counter() - t;"
            "heavy = [m for m in ('onnxruntime', 'openvino', 'tensorrt', 'onnx', 'numpy',"
            " 'importlib.metadata', 'pynvml') if m in sys.modules]; print(heavy, dt)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    heavy, seconds = out.stdout.rsplit(" ", 1)
    # ~0.04 s on a quiet machine; the bound only catches a heavy import sneaking in under load.
    assert heavy == "[]" and float(seconds) < 1.0, out.stdout


# --- cheap probing -------------------------------------------------------------------------

def test_package_version_reads_dist_info_or_version_line(tmp_path, monkeypatch):
    for name, version in (("c10fakea", "1.2.3"), ("c10fakeb", None)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text('__version__ = "9.9.9"\n')
        if version:
            (tmp_path / f"{name}-{version}.dist-info").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    assert backends.package_version("c10fakea") == "1.2.3"
    assert backends.package_version("c10fakeb") == "9.9.9"
    assert "c10fakea" not in sys.modules
    assert backends.package_version("c10_not_installed") is None


def test_onnxruntime_version_without_import():
    import onnxruntime

    assert OnnxRuntimeBackend().version() == onnxruntime.__version__


# --- TensorRT: key, metadata and error logic only (never run here) -------------------------

def fake_trt(sm: str = "sm_86", name: str = "NVIDIA RTX A4000", driver: str = "550.54",
             **options) -> TensorRTBackend:
    backend = TensorRTBackend(**options)
    backend.__dict__["_gpu"] = {"sm": sm, "name": name, "driver": driver, "cuda_driver": "12.4"}
    return backend


def test_tensorrt_key_follows_sm_and_flags_not_gpu_name_or_driver(onnx_file):
    spec = spec_for(onnx_file, precision="fp16")
    key = engine_key(spec, fake_trt())
    assert engine_key(spec, fake_trt(name="NVIDIA A10", driver="560.1")) == key
    assert engine_key(spec, fake_trt(sm="sm_89")) != key
    assert engine_key(spec, fake_trt(hardware_compat="ampere_plus")) != key
    assert engine_key(spec, fake_trt(version_compatible=True)) != key
    fp = fake_trt().host_fingerprint()
    assert {"sm", "cuda", "tensorrt", "os_arch", "hardware_compat", "version_compatible"} == set(fp)
    meta = fake_trt().host_metadata()
    assert meta["gpu"] == "NVIDIA RTX A4000" and meta["driver"] == "550.54"


def test_tensorrt_int8_key_follows_the_calibration_cache(tmp_path, onnx_file):
    spec = spec_for(onnx_file, precision="int8", calibration_path=tmp_path / "c",
                    calibration_hash="a")
    assert (engine_key(spec, fake_trt())
            != engine_key(replace(spec, calibration_hash="b"), fake_trt()))


def test_tensorrt_timing_cache_is_keyed_by_version_sm_and_cuda(tmp_path):
    path = fake_trt(sm="sm_87", timing_cache_dir=tmp_path).timing_cache_path()
    fp = fake_trt(sm="sm_87").host_fingerprint()
    assert path.parent == tmp_path
    assert path.name == f"timing-trt{fp['tensorrt']}-sm_87-cuda{fp['cuda']}.cache"


def test_tensorrt_compile_here_fails_with_an_install_hint(tmp_path, onnx_file):
    with pytest.raises(EngineBuildError, match="pip install 'c10\\[tensorrt\\]'"):
        build_engine(spec_for(onnx_file), fake_trt(), tmp_path / "engines")
    assert not (tmp_path / "engines").exists()


def test_tensorrt_checks_calibration_before_the_backend(tmp_path, onnx_file, monkeypatch):
    monkeypatch.setattr(TensorRTBackend, "available", lambda self: True)
    with pytest.raises(CalibrationCacheError):
        build_engine(spec_for(onnx_file, precision="int8"), fake_trt(), tmp_path)


def test_tensorrt_rejects_unknown_hardware_compat():
    with pytest.raises(EngineBuildError, match="ampere_plus"):
        TensorRTBackend(hardware_compat="turing_plus")
