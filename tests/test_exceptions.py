"""The seed's exception taxonomy: every hard error of a build is one of the seed's six classes
(CP-TC-7..9 through the API), and each class keeps its exit code and message."""
from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import api_request, rewrite, snapshot
from PIL import Image

from c10 import errors
from c10.api import DoitCacheProvisioner
from c10.errors import (
    RERUN,
    BuildLockHeldError,
    C10Error,
    CalibrationCacheError,
    ConfigError,
    DescriptorBatchError,
    EngineBuildError,
    ManifestCoverageError,
    ManifestWriteError,
)
from c10.features.preprocess import Preprocessing

SEED = (BuildLockHeldError, ManifestCoverageError, EngineBuildError, CalibrationCacheError,
        DescriptorBatchError, ManifestWriteError)


@pytest.mark.parametrize("cls, seed", [
    (errors.SigningKeyError, ManifestWriteError),     # seed: key load failure
    (errors.StorageError, ManifestWriteError),        # seed: atomic-write failure
    (errors.ModelError, EngineBuildError),
    (errors.EngineMismatchError, EngineBuildError),   # D-C10-6, the engine compiler's
    (errors.IndexBuildError, DescriptorBatchError),
    (errors.CacheRootMissingError, ConfigError),      # a bad request, not a build step
])
def test_each_c10_class_is_its_seed_class(cls, seed):
    assert issubclass(cls, seed) and issubclass(cls, C10Error)


def test_outside_the_seeds_six_only_requests_soft_failures_and_other_tools():
    outside = {name for name, cls in vars(errors).items()
               if isinstance(cls, type) and issubclass(cls, C10Error)
               and not issubclass(cls, SEED)}
    assert outside == {"C10Error", "BuildStepError", "ConfigError", "CacheRootMissingError",
                       "MissingTilesError", "TileError", "TrustedKeyError", "VerifyError"}


def test_exit_codes_and_messages_are_kept():
    assert (ConfigError.exit_code, errors.CacheRootMissingError.exit_code,
            BuildLockHeldError.exit_code) == (2, 2, 3)
    assert errors.StorageError("x").exit_code == errors.SigningKeyError("x").exit_code == 1
    # no `then` where the class had none: their messages name their own next step
    assert str(errors.SigningKeyError("key gone", "make one")) == "key gone; make one"
    assert str(errors.EngineMismatchError("other host")) == "other host"
    assert (str(errors.ModelError("bad onnx", "re-export it"))
            == f"bad onnx; re-export it, then {RERUN}")
    assert str(errors.IndexBuildError("faiss")) == f"faiss; {RERUN}"
    assert isinstance(errors.StorageError("disk full"), OSError)


# --- the raise paths, each for real ---------------------------------------------------------

def test_a_key_that_fails_to_load_is_a_manifest_write_error(tmp_path):
    from c10.trust.keys import load_signing_key

    with pytest.raises(ManifestWriteError, match="does not exist") as info:
        load_signing_key(tmp_path / "nowhere.pem", passphrase=None, cache_root=None)
    assert type(info.value) is errors.SigningKeyError


def test_a_bad_trusted_key_is_not_a_build_error(tmp_path):
    from c10.trust.keys import load_trusted_keys

    (tmp_path / "bad.pub").write_bytes(b"hello")
    with pytest.raises(errors.TrustedKeyError) as info:
        load_trusted_keys([tmp_path / "bad.pub"])
    assert not isinstance(info.value, SEED)


def test_signing_bytes_the_verifier_refuses_is_a_manifest_write_error(tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from c10.trust.manifest import write_signed_manifest

    with pytest.raises(ManifestWriteError, match="verifier would reject") as info:
        write_signed_manifest(tmp_path, b"{}", Ed25519PrivateKey.generate())
    assert isinstance(info.value.__cause__, errors.VerifyError)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_durable_write_is_a_manifest_write_error(tmp_path, monkeypatch):
    from c10.store import atomic

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(ManifestWriteError, match="cannot write it") as info:
        atomic.write_bytes(tmp_path / "x.npy", b"data")
    assert isinstance(info.value, errors.StorageError) and isinstance(info.value, OSError)


def test_an_onnx_that_does_not_parse_is_an_engine_build_error(tmp_path):
    from c10.features.engines import EngineSpec, inspect_model

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx")
    spec = EngineSpec(model="global", onnx_path=bad, onnx_hash="0", input_shape=(3, 32, 32),
                      precision="fp32", workspace_mb=64, batch=(1, 4, 8))
    with pytest.raises(EngineBuildError, match="not a valid ONNX") as info:
        inspect_model(spec)
    assert type(info.value) is errors.ModelError


def test_a_bad_faiss_factory_is_a_descriptor_batch_error():
    from c10.config import Index
    from c10.features.index import make_index

    with pytest.raises(DescriptorBatchError, match="index.factory") as info:
        make_index(np.zeros((4, 8), np.float32), Index(factory="NoSuchIndex"))
    assert type(info.value) is errors.IndexBuildError


def test_a_missing_cache_root_is_a_config_error(tmp_path):
    from c10.store.lock import require_cache_root

    with pytest.raises(ConfigError, match="does not exist"):
        require_cache_root(tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


# --- inference failures: DescriptorBatchError (CP-TC-9) ---------------------------------------

PREP = Preprocessing((16, 16), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def tiles(tmp_path: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        path = tmp_path / f"15/1/{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), np.uint8)).save(path)
        out.append(path)
    return out


def reshape_model():
    """A real ONNX Runtime session whose Reshape fits only a batch of one: a runtime error of the
    engine itself, as an out-of-memory would be."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    shape = numpy_helper.from_array(np.array([1, 3 * 16 * 16], np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["image", "shape"], ["descriptor"])], "bad",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 3, 16, 16])],
        [helper.make_tensor_value_info("descriptor", TensorProto.FLOAT, [1, 768])], [shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    onnx.checker.check_model(model)
    return lambda batch: session.run(None, {"image": batch})[0]


def test_an_onnxruntime_failure_while_embedding_is_a_descriptor_batch_error(tmp_path):
    from c10.features.embedding import embed_tiles

    paths = tiles(tmp_path, 6)
    run = reshape_model()
    assert embed_tiles(run, paths[:1], PREP, batch_size=1).shape == (1, 768)  # the model runs
    with pytest.raises(DescriptorBatchError, match="the engine failed on") as info:
        embed_tiles(run, paths, PREP, batch_size=3, workers=1)
    assert type(info.value.__cause__).__module__.startswith("onnxruntime")
    assert str(paths[0]) in str(info.value) and RERUN in str(info.value)


def test_any_runtime_error_of_an_engine_is_wrapped_and_a_bad_tile_passes_unchanged(tmp_path):
    from c10.features.embedding import embed_tiles, run_local

    paths = tiles(tmp_path, 2)

    class Oom:
        input_names, output_names = ["image"], ["keypoints", "descriptors", "scores"]

        def __call__(self, batch):
            raise RuntimeError("CUDA out of memory")

        def run(self, feeds):
            raise EngineBuildError("CUDA call failed: cudaErrorMemoryAllocation")  # TensorRT's

    with pytest.raises(DescriptorBatchError, match="RuntimeError: CUDA out of memory"):
        embed_tiles(Oom(), paths, PREP)
    with pytest.raises(DescriptorBatchError, match="EngineBuildError: CUDA call failed") as info:
        run_local(Oom(), np.zeros((1, 3, 16, 16), np.float32), paths[0])
    assert str(paths[0]) in str(info.value)
    paths[1].write_bytes(b"not a png")
    with pytest.raises(DescriptorBatchError, match="1.png") as info:
        embed_tiles(Oom(), paths, PREP, workers=1)
    assert info.value.__cause__ is None or not isinstance(info.value.__cause__, RuntimeError)


# --- through the seed's API: CP-TC-7..9 raise the seed's classes ------------------------------





def test_api_key_load_failure_is_a_manifest_write_error_with_zero_writes(cache, operator_key,
                                                                         tmp_path):  # CP-TC-7
    impl = DoitCacheProvisioner()
    impl.build_cache_artifacts(api_request(cache, operator_key))
    before = snapshot(cache)
    with pytest.raises(ManifestWriteError, match="does not exist"):
        impl.build_cache_artifacts(api_request(cache, operator_key, key_path=tmp_path / "gone.pem"))
    assert snapshot(cache) == before


def test_api_bad_onnx_is_an_engine_build_error(cache, operator_key):  # CP-TC-8
    impl = DoitCacheProvisioner()
    impl.build_cache_artifacts(api_request(cache, operator_key))
    before = (cache / "Manifest.json").read_bytes()
    (cache / "models/global.onnx").write_bytes(b"\x08\x07 truncated")
    with pytest.raises(EngineBuildError, match="not a valid ONNX"):
        impl.build_cache_artifacts(api_request(cache, operator_key))
    assert (cache / "Manifest.json").read_bytes() == before


def test_api_inference_failure_is_a_descriptor_batch_error(cache, operator_key,
                                                           monkeypatch):  # CP-TC-9
    from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException

    from c10.features.backends.onnxruntime import OrtRunner

    impl = DoitCacheProvisioner()
    impl.build_cache_artifacts(api_request(cache, operator_key))
    before = (cache / "Manifest.json").read_bytes()

    def oom(self, feeds):
        raise RuntimeException("Failed to allocate memory for requested buffer of size 1 GB")

    monkeypatch.setattr(OrtRunner, "run_stream", oom)
    tile = sorted((cache / "tiles/15").rglob("*.jpg"))[0]
    rewrite(tile, tile.read_bytes() + b"\0")  # its shard is re-embedded
    with pytest.raises(DescriptorBatchError, match="RuntimeException: Failed to allocate"):
        impl.build_cache_artifacts(api_request(cache, operator_key))
    assert (cache / "Manifest.json").read_bytes() == before


def test_doit_with_a_refused_key_changes_only_doits_records(cache, operator_key, tmp_path,
                                                            capsys):  # CP-TC-7 from the CLI
    """`doit build_cache` with a key outside signing.allowed_keyids fails naming the key and the
    fix; what it says is true: nothing outside .c10/ changed, the Manifest pair is the one in
    force, and `c10 verify` still accepts the cache."""
    from conftest import build, built

    from c10.cli import main as c10_main
    from c10.trust.keys import generate_key

    built(cache, capsys)
    other = tmp_path / "keys" / "intruder.pem"
    other.parent.mkdir()
    generate_key(other)
    text = (cache / "c10.toml").read_text()
    (cache / "c10.toml").write_text(re.sub(r'^key = ".*?"', f'key = "{other}"', text, count=1,
                                           flags=re.M))
    before = snapshot(cache)
    code, out = build(cache, capsys)
    assert code != 0 and "ManifestWriteError" in out and "not in signing.allowed_keyids" in out
    assert "nothing was signed and the Manifest in force is unchanged" in out
    assert "No file was written" not in out
    changed = {rel for rel in set(before) | set(snapshot(cache)) if before.get(rel) !=
               snapshot(cache).get(rel)}
    assert changed and all(rel.startswith(".c10/") for rel in changed), changed
    assert c10_main(["verify", str(cache), "--trusted-keys", str(operator_key[1]), "--state",
                     str(tmp_path / "state.json")]) == 0
