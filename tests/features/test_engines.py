"""Engine identity keys, build-or-reuse, sidecar checks and clear failures (real onnxruntime
runs)."""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import onnx
import pytest
from tiny_models import images, reference, row_cosine, spec_for, tiny_cnn

from c10.errors import (
    CalibrationCacheError,
    ConfigError,
    EngineBuildError,
    EngineMismatchError,
    ModelError,
)
from c10.features.backends.onnxruntime import OnnxRuntimeBackend
from c10.features.engines import (
    build_engine,
    check_calibration_for,
    engine_key,
    engine_path,
    key_material,
    load_engine,
    sidecar_path,
)


class FakeBackend(OnnxRuntimeBackend):
    """ORT with a chosen version and host: stands for an upgrade or another machine."""

    def __init__(self, version: str = "1.31.1", host: dict | None = None) -> None:
        self._version = version
        self.__dict__["_fingerprint"] = host or {"os_arch": "linux-x86_64", "version": version}

    def version(self) -> str:
        return self._version


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# --- the identity key ----------------------------------------------------------------------

def test_key_is_sha256_of_canonical_json(onnx_file):
    backend, spec = OnnxRuntimeBackend(), spec_for(onnx_file)
    material = key_material(spec, backend)
    canonical = json.dumps(material, sort_keys=True, separators=(",", ":"))
    assert engine_key(spec, backend) == hashlib.sha256(canonical.encode()).hexdigest()
    assert {"schema", "onnx_hash", "backend", "backend_version", "host", "precision",
            "calibration_hash", "workspace_mb", "input_shape", "batch"} == set(material)
    assert str(onnx_file) not in canonical and "global.onnx" not in canonical


def test_key_changes_with_everything_that_makes_an_engine_valid(tmp_path, onnx_file):
    backend = FakeBackend()
    base = spec_for(onnx_file)
    other_weights = tiny_cnn(tmp_path / "other.onnx", seed=1)
    int8 = replace(base, precision="int8", calibration_path=tmp_path / "c", calibration_hash="aa")
    variants = {
        "weights": (spec_for(other_weights), backend),
        "precision": (replace(base, precision="fp16"), backend),
        "backend version": (base, FakeBackend(version="1.32.0", host=backend.host_fingerprint())),
        "workspace": (replace(base, workspace_mb=2048), backend),
        "host": (base, FakeBackend(host={"os_arch": "linux-aarch64", "version": "1.31.1"})),
        "input shape": (replace(base, input_shape=(3, 64, 64)), backend),
        "batch profile": (replace(base, batch=(1, 16, 32)), backend),
    }
    key = engine_key(base, backend)
    for what, (spec, be) in variants.items():
        assert engine_key(spec, be) != key, what
    assert engine_key(replace(int8, calibration_hash="bb"), backend) != engine_key(int8, backend)
    assert engine_key(int8, backend) != key


def test_key_ignores_the_onnx_path_and_name(tmp_path, onnx_file):
    backend = OnnxRuntimeBackend()
    moved = tmp_path / "elsewhere" / "renamed-model.onnx"
    moved.parent.mkdir()
    shutil.copy(onnx_file, moved)
    assert engine_key(spec_for(moved), backend) == engine_key(spec_for(onnx_file), backend)
    # A calibration cache only matters to an int8 engine.
    spec = spec_for(onnx_file)
    assert engine_key(replace(spec, calibration_hash="cc"), backend) == engine_key(spec, backend)


def test_engine_and_sidecar_paths(tmp_path, onnx_file):
    backend, spec = OnnxRuntimeBackend(), spec_for(onnx_file)
    path = engine_path(tmp_path / "engines", spec, backend)
    assert path == tmp_path / "engines" / f"global-{engine_key(spec, backend)}.onnx"
    assert sidecar_path(path) == path.with_name(path.stem + ".json")


def test_spec_rejects_unknown_precision_and_bad_batch(onnx_file):
    with pytest.raises(ConfigError, match="models.global.precision"):
        spec_for(onnx_file, precision="fp8")
    for bad in ((8, 4, 16), (0, 1, 2), (1, 2)):
        with pytest.raises(ConfigError, match="min <= opt <= max"):
            spec_for(onnx_file, batch=bad)


# --- build, reuse, load --------------------------------------------------------------------

def test_build_reuses_engine_for_same_key_and_rebuilds_on_change(tmp_path, onnx_file):
    backend, engines = OnnxRuntimeBackend(), tmp_path / "engines"
    path, built = build_engine(spec_for(onnx_file), backend, engines)
    assert built and path.is_file() and sidecar_path(path).is_file()
    before = path.stat().st_mtime_ns, path.read_bytes()
    moved = shutil.copy(onnx_file, tmp_path / "moved.onnx")
    again, built_again = build_engine(spec_for(Path(moved)), backend, engines)
    assert (again, built_again) == (path, False)
    assert (path.stat().st_mtime_ns, path.read_bytes()) == before
    sidecar = json.loads(sidecar_path(path).read_text())
    assert sidecar["key"] == path.stem.split("-", 1)[1]
    assert sidecar["material"]["host"] == backend.host_fingerprint()
    assert "cpu" in sidecar["host_metadata"]
    changed = tiny_cnn(tmp_path / "models" / "global.onnx", seed=7)
    new_path, rebuilt = build_engine(spec_for(changed), backend, engines)
    assert rebuilt and new_path != path and path.is_file()


def test_engine_without_sidecar_is_rebuilt(tmp_path, onnx_file):
    backend = OnnxRuntimeBackend()
    path, _ = build_engine(spec_for(onnx_file), backend, tmp_path)
    sidecar_path(path).unlink()
    assert build_engine(spec_for(onnx_file), backend, tmp_path) == (path, True)


def test_ort_engine_agrees_with_plain_session_and_is_deterministic(tmp_path, onnx_file):
    backend, spec = OnnxRuntimeBackend(), spec_for(onnx_file)
    path, _ = build_engine(spec, backend, tmp_path / "a")
    runner = load_engine(path, spec, backend)
    assert runner.input_names == ["image"] and runner.output_names == ["descriptor"]
    batch = images(5)
    assert row_cosine(runner(batch), reference(onnx_file, batch)).min() >= 0.999
    other, _ = build_engine(spec, backend, tmp_path / "b")
    assert other.read_bytes() == path.read_bytes()


def test_loading_another_hosts_engine_names_both_fingerprints(tmp_path, onnx_file):
    spec = spec_for(onnx_file)
    builder = FakeBackend(host={"os_arch": "linux-aarch64", "version": "1.31.1"})
    path, _ = build_engine(spec, builder, tmp_path)
    here = FakeBackend(host={"os_arch": "linux-x86_64", "version": "1.31.1"})
    with pytest.raises(EngineMismatchError) as err:
        load_engine(path, spec, here)
    assert "linux-aarch64" in str(err.value) and "linux-x86_64" in str(err.value)
    assert "doit engines:global" in str(err.value)


def test_loading_with_another_request_is_a_mismatch(tmp_path, onnx_file):
    backend = OnnxRuntimeBackend()
    path, _ = build_engine(spec_for(onnx_file), backend, tmp_path)
    with pytest.raises(EngineMismatchError, match="workspace_mb"):
        load_engine(path, spec_for(onnx_file, workspace_mb=64), backend)


def test_loading_without_sidecar_says_rebuild(tmp_path, onnx_file):
    backend = OnnxRuntimeBackend()
    path, _ = build_engine(spec_for(onnx_file), backend, tmp_path)
    sidecar_path(path).unlink()
    with pytest.raises(EngineBuildError, match="doit engines:global"):
        load_engine(path, spec_for(onnx_file), backend)


# --- clear failures that lose nothing ------------------------------------------------------

@pytest.fixture
def built(tmp_path, onnx_file):
    """An engines dir holding one good engine; every failure below must leave it as it is."""
    engines = tmp_path / "engines"
    build_engine(spec_for(onnx_file), OnnxRuntimeBackend(), engines)
    return engines, snapshot(engines)


def test_malformed_onnx_is_a_model_error(tmp_path, built):
    engines, before = built
    bad = tmp_path / "models" / "broken.onnx"
    bad.write_bytes(b"\x08\x07this is not a protobuf at all" * 10)
    with pytest.raises(ModelError) as err:
        build_engine(spec_for(bad), OnnxRuntimeBackend(), engines)
    assert str(bad) in str(err.value) and "re-export" in str(err.value)
    assert snapshot(engines) == before


def test_empty_onnx_is_a_model_error(tmp_path, built):
    engines, before = built
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelError, match="re-export"):
        build_engine(spec_for(empty), OnnxRuntimeBackend(), engines)
    assert snapshot(engines) == before


def test_input_shape_disagreeing_with_config_names_both_shapes(tmp_path, built, onnx_file):
    engines, before = built
    with pytest.raises(ModelError) as err:
        build_engine(spec_for(onnx_file, input_shape=(3, 224, 224)), OnnxRuntimeBackend(), engines)
    message = str(err.value)
    assert "[N, 3, 32, 32]" in message and "[N, 3, 224, 224]" in message
    assert "models.global.input_size" in message
    assert snapshot(engines) == before


def test_int8_without_or_with_missing_calibration_cache(tmp_path, built, onnx_file):
    engines, before = built
    with pytest.raises(CalibrationCacheError, match="models.global.calibration"):
        build_engine(spec_for(onnx_file, precision="int8"), OnnxRuntimeBackend(), engines)
    missing = tmp_path / "nope.cache"
    spec = spec_for(onnx_file, precision="int8", calibration_path=missing, calibration_hash="00")
    with pytest.raises(CalibrationCacheError, match="nope.cache"):
        build_engine(spec, OnnxRuntimeBackend(), engines)
    assert snapshot(engines) == before


def test_calibration_cache_for_another_model(tmp_path, onnx_file):
    cache = b"TRT-100300-EntropyCalibration2\ninput_ids: 3c010a14\nlogits: 3d8f5c29\n"
    spec = spec_for(onnx_file, precision="int8", calibration_path=tmp_path / "c",
                    calibration_hash="0")
    with pytest.raises(CalibrationCacheError, match="another model"):
        check_calibration_for(spec, cache, ["image"])
    check_calibration_for(spec, b"TRT-100300-EntropyCalibration2\nimage: 3c010a14\n", ["image"])


def test_backend_failure_carries_the_backends_message(tmp_path, built):
    engines, before = built
    # Valid ONNX that onnxruntime cannot run: an op of a domain the checker does not know (so does
    # not check) and no runtime implements. (An IR version newer than ORT's stopped working as the
    # example once onnxruntime 1.32 read the IR 14 that onnx 1.23 writes.)
    custom = tiny_cnn(tmp_path / "custom.onnx")
    model = onnx.load(str(custom))
    model.opset_import.append(onnx.helper.make_opsetid("ai.c10.test", 1))
    model.graph.node[-1].domain, model.graph.node[-1].op_type = "ai.c10.test", "Mystery"
    onnx.save(model, str(custom))
    with pytest.raises(EngineBuildError) as err:
        build_engine(spec_for(custom), OnnxRuntimeBackend(), engines)
    assert "Mystery" in str(err.value) and str(custom) in str(err.value)
    assert snapshot(engines) == before


def test_unsupported_precision_names_the_config_key(tmp_path, built, onnx_file):
    engines, before = built
    with pytest.raises(EngineBuildError, match="models.global.precision"):
        build_engine(spec_for(onnx_file, precision="fp16"), OnnxRuntimeBackend(), engines)
    assert snapshot(engines) == before
