"""ONNX Runtime backend: an ONNX optimized at EXTENDED level, portable and byte-deterministic."""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING

from c10.features.backends import Backend, Runner, os_arch, package_dir, package_version
from c10.store.atomic import atomic_path

if TYPE_CHECKING:
    import numpy as np

    from c10.features.engines import EngineSpec, ModelInfo


def import_onnxruntime():
    """The `onnxruntime` module with its usage telemetry off (onnxruntime 1.32 otherwise queues
    events in ~/.cache/Microsoft/DeveloperTools/.onnxruntime/ for a later upload): every c10
    import of onnxruntime goes through here. Set in the environment, where the runtime reads it,
    before the import; done here, not at module import (no import-time side effect)."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime

    return onnxruntime


class OnnxRuntimeBackend(Backend):
    """The universal fallback: runs everywhere onnxruntime does, fp32, or INT8 statically
    quantized on the cache's own tiles (c10.features.int8).

    The EXTENDED graph holds fusions for the CPU execution provider, so the fingerprint is
    onnxruntime's flavour and version plus OS/arch; the host-specific layout passes of the
    ALL level are applied when the engine is loaded, not baked into the file.
    """

    name = "onnxruntime"
    suffix = ".onnx"
    install_hint = "pip install onnxruntime"
    precisions = ("fp32", "int8")

    def version(self) -> str:
        return _build_info().get("__version__") or package_version("onnxruntime") or "unknown"

    def _fingerprint(self) -> dict:
        return {"package": _build_info().get("package_name", "onnxruntime"),
                "version": self.version(), "os_arch": os_arch(), "provider": "CPUExecutionProvider"}

    def quantizer(self) -> dict:
        from c10.features.int8 import QUANTIZER

        return {**QUANTIZER, "version": self.version()}

    def _compile(self, spec: EngineSpec, model: ModelInfo, calibration: bytes | None,
                 out: Path) -> dict:
        ort = import_onnxruntime()
        info = {"optimization_level": "ORT_ENABLE_EXTENDED", "ort_version": ort.__version__}
        if spec.precision == "int8":
            from c10.features.int8 import compile_int8

            return info | compile_int8(spec, calibration, out, self._optimize, ort.__version__)
        self._optimize(spec.onnx_path, out)
        return info

    def _optimize(self, onnx_path: Path, out: Path) -> None:
        ort = import_onnxruntime()

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        # The temp name ends in .tmp: say ONNX explicitly (a .ort suffix would switch format).
        options.add_session_config_entry("session.save_model_format", "ONNX")
        with atomic_path(out) as tmp:
            options.optimized_model_filepath = str(tmp)
            ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    def _load(self, data: bytes, spec: EngineSpec) -> Runner:
        ort = import_onnxruntime()

        options = ort.SessionOptions()
        streams, threads = ort_streams(os.cpu_count() or 1)
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Waiting intra-op threads sleep instead of spinning on cores that decode tiles.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        return OrtRunner(session, streams)


# Several calls at once, one thread each (Runner.streams), rather than one call on every core:
# ORT's intra-op threads wait at every op for the one that shares its core with a decoding tile.
# Measured (bench/embed.py): tiles embed closer to the raw engine's rate with one call per core
# on one thread each than with one call on every core; the raw engine is no slower (figures in
# docs/figures.md). Each stream holds a batch's activations, so a large host gets at most
# MAX_STREAMS streams of several threads each (not measured here: these machines have 2 cores).
MAX_STREAMS = 8


def ort_streams(cpus: int) -> tuple[int, int]:
    """(concurrent calls, intra-op threads per call) for `cpus` cores."""
    streams = max(1, min(cpus, MAX_STREAMS))
    return streams, -(-cpus // streams)


class OrtRunner(Runner):
    """An ORT session; `run_stream` may be called from several threads at once (Session.run is
    thread-safe)."""

    def __init__(self, session, streams: int = 1) -> None:
        self.session, self.streams = session, streams
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    def run_stream(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.output_names, feeds)


@functools.cache
def _build_info() -> dict:
    """`onnxruntime/capi/build_and_package_info.py` holds package name and version; read, not
    imported."""
    pkg = package_dir("onnxruntime")
    info: dict[str, str] = {}
    if pkg is None:
        return info
    try:
        text = (pkg / "capi" / "build_and_package_info.py").read_text(encoding="utf-8")
    except OSError:
        return info
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            info[key.strip()] = value.strip().strip("'\"")
    return info
