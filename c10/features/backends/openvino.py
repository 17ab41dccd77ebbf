"""OpenVINO backend: a CPU-compiled blob, tied to the CPU's ISA and the OpenVINO version."""
from __future__ import annotations

import contextlib
import logging
import re
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from c10.features.backends import Backend, Runner, cpu_info, os_arch, package_version, run_chunked
from c10.store.atomic import write_bytes

if TYPE_CHECKING:
    import numpy as np

    from c10.features.engines import EngineSpec, ModelInfo

# The ISA extensions the OpenVINO CPU plugin dispatches on (x86 and ARM spellings).
_ISA = re.compile(r"^(sse4_[12]|avx|avx2|fma|f16c|avx512.*|amx.*|avx_vnni.*|avxvnni.*"
                  r"|avx_ne_convert|asimd.*|fphp|sve.*|bf16|i8mm)$")
# int8: what NNCF leaves unquantized runs in f32 (the CPU's bf16 default would move it again)
_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}
# How an INT8 engine is quantized besides its sample; with NNCF's version, part of its key.
# The GeM tail (Clamp, Power, ReduceMean) and the L2 norm stay unquantized: on the demo model
# calibrated on its own tiles NNCF's defaults gave a min cosine of 0.81, without them 0.9956
# (figures in docs/figures.md).
QUANTIZER = {"tool": "nncf.quantize", "preset": "PERFORMANCE", "subset_size": "whole sample",
             "ignored_types": ["Clamp", "NormalizeL2", "Power", "ReduceMean"]}
# Measured on the shared build machine (bench/engines.py, demo global model, interleaved
# windows): in quiet windows a batch split over THROUGHPUT's streams and one LATENCY request on
# every core tie; with other jobs on the machine (the median window, and the real case while
# tiles decode beside inference) the split was faster (figures in docs/figures.md). Batch 1 is
# slower with it (one stream), which tile embedding never uses.
# The hint is applied again on import, so it is not part of the engine key.
DEFAULT_HINT = "THROUGHPUT"
_IMPORT_LOCK = threading.Lock()
_numpy_bridge_ready = False
_FIRST_CALL_LOCK = threading.Lock()  # every thread's first inference call: one at a time (OvRunner)


def import_openvino():
    """The `openvino` module, imported with OpenVINO's usage telemetry off: every c10 import of
    openvino goes through here (build, query/selftest, export, Dask workers).

    `import openvino` imports `openvino.tools.ovc`, whose `telemetry_utils` imports
    `openvino_telemetry` and, at import, sends a Google Analytics event from a forked child (a
    lookup of www.google-analytics.com, then an HTTPS POST) and writes `~/intel/openvino_ga_cid`
    and `~/intel/stats`. Its documented opt-outs both write under $HOME
    (`~/intel/openvino_telemetry` = 0), and `opt_in_out --opt_out` also sends a "declined" event.
    Instead that module is made unimportable for this process, so `telemetry_utils` takes its own
    ImportError path to `openvino.tools.ovc.telemetry_stub`, whose methods do nothing: no file,
    no socket, no environment change, nothing inherited by children. Done here, not at module
    import, so importing c10 has no side effect; too late only if something else imported
    openvino (or openvino_telemetry) first in this process.

    It also makes the process's first `Tensor.data` call, on one thread: two threads making
    their first calls at once deadlock in the bindings (pybind11's numpy setup takes the GIL
    inside a static initializer; `c10 selftest` hung in 2 of 20 runs), and `OvRunner.run` makes
    its calls from several threads (which also make their own first calls one at a time)."""
    global _numpy_bridge_ready
    with _IMPORT_LOCK:
        sys.modules.setdefault("openvino_telemetry", None)
        import openvino

        if not _numpy_bridge_ready:
            import numpy as np

            openvino.Tensor(np.zeros(1, np.float32)).data
            _numpy_bridge_ready = True
    return openvino


class OpenVinoBackend(Backend):
    """OpenVINO on the CPU; fp32, bf16 or fp16 inference precision, or INT8 quantized by NNCF
    on the cache's own tiles (c10.features.int8)."""

    name = "openvino"
    suffix = ".blob"
    install_hint = "pip install 'c10[openvino]' (or: pip install openvino)"
    precisions = ("fp32", "bf16", "fp16", "int8")

    def __init__(self, performance_hint: str = DEFAULT_HINT) -> None:
        self.performance_hint = performance_hint
        self._core = None

    def version(self) -> str:
        return package_version("openvino", ("openvino", "openvino_nightly")) or "unknown"

    def _fingerprint(self) -> dict:
        cpu = cpu_info()
        isa = [flag for flag in cpu["flags"] if _ISA.match(flag)]
        return {"device": "CPU", "cpu_model": cpu["model"], "isa": isa,
                "openvino": self.version(), "os_arch": os_arch()}

    def quantizer(self) -> dict:
        return {**QUANTIZER, "version": package_version("nncf") or "not installed"}

    def core(self):
        if self._core is None:
            self._core = import_openvino().Core()
        return self._core

    def _compile(self, spec: EngineSpec, model: ModelInfo, calibration: bytes | None,
                 out: Path) -> dict:
        ov = import_openvino()

        core = self.core()
        network = core.read_model(str(spec.onnx_path))
        if spec.input_shape is not None:
            # The image input gets the request's size and the dynamic batch profile.
            lo, _, hi = spec.batch
            first = network.inputs[0]
            network.reshape({first.get_any_name(): ov.PartialShape(
                [ov.Dimension(lo, hi), *spec.input_shape])})
        config = {"INFERENCE_PRECISION_HINT": _PRECISION[spec.precision],
                  "PERFORMANCE_HINT": self.performance_hint}
        extra = {}
        if spec.precision == "int8":
            network, extra = self._quantize(spec, network, calibration)
        compiled = core.compile_model(network, "CPU", config)
        if extra:
            from c10.features.int8 import gate

            extra["int8_gate"] = gate(spec, lambda batch: _infer_all(compiled, batch, spec),
                                      extra.pop("calib"), out)
        blob = compiled.export_model()
        write_bytes(out, blob.getvalue() if hasattr(blob, "getvalue") else bytes(blob))
        actual = compiled.get_property("INFERENCE_PRECISION_HINT")
        # The CPU may substitute (e.g. f16 runs as bf16 without avx512_fp16): record what runs.
        return {"inference_precision": getattr(actual, "get_type_name", lambda: str(actual))(),
                "requested_precision": _PRECISION[spec.precision],
                "openvino_build": ov.get_version(), "performance_hint": self.performance_hint,
                **extra}

    def _quantize(self, spec: EngineSpec, network, calibration: bytes | None):
        """(network quantized by NNCF on the calibration sample, build info with the sample)."""
        import time

        from c10.errors import EngineBuildError
        from c10.features.int8 import batches, calibration_tensors

        calib = calibration_tensors(spec, calibration)
        try:
            import nncf
        except ImportError:
            raise EngineBuildError(
                f"model {spec.model!r} has precision int8 on OpenVINO, which needs NNCF",
                "pip install 'c10[openvino-int8]' (or: pip install nncf), or set "
                f"models.{spec.model}.precision = \"fp32\"") from None
        start = time.perf_counter()
        parts = batches(spec, calib)
        # NNCF logs and draws progress bars on stdout: keep it for the build's own output
        nncf.set_log_level(logging.ERROR)
        with contextlib.redirect_stdout(sys.stderr):
            quantized = nncf.quantize(
                network, nncf.Dataset(parts), preset=nncf.QuantizationPreset.PERFORMANCE,
                subset_size=len(parts),  # NNCF counts the dataset's items: batches
                ignored_scope=nncf.IgnoredScope(types=QUANTIZER["ignored_types"],
                                                validate=False))
        return quantized, {"quantizer": QUANTIZER, "quantizer_version": nncf.__version__,
                           "calibration_samples": len(calib), "calib": calib,
                           "calibration_s": round(time.perf_counter() - start, 3)}

    def _load(self, data: bytes, spec: EngineSpec) -> Runner:
        # An imported blob does not keep its inference precision: without the hint it runs the
        # CPU's default (bf16 with AMX), measurably off an f32 engine (figure in docs/figures.md).
        compiled = self.core().import_model(
            data, "CPU",
            {"PERFORMANCE_HINT": self.performance_hint,
             "INFERENCE_PRECISION_HINT": _PRECISION[spec.precision]})
        return OvRunner(compiled, spec.batch[2] if spec.input_shape is not None else None)


def _infer_all(compiled, batch: np.ndarray, spec: EngineSpec) -> dict:
    """{output name: array} of a compiled model on `batch`, in calls its batch profile takes."""
    import numpy as np

    size = min(32, spec.batch[2])
    parts = [compiled(batch[i:i + size]) for i in range(0, len(batch), size)]
    return {o.get_any_name(): np.concatenate([np.array(p[o]) for p in parts])
            for o in compiled.outputs}


class OvRunner(Runner):
    """`streams` = the THROUGHPUT hint's optimal number of infer requests. `run_stream` may be
    called from any number of threads at once: at most `streams` of them infer at a time (the
    others wait), so a batch split over them by `run` keeps every core busy.

    No infer request is ever shared between threads: each thread that infers gets its own,
    created on its first call and kept thread-locally for the runner's lifetime, and everything
    that touches it (data_dispatcher copying the inputs in, `infer`, the outputs' `Tensor.data`
    copies) runs on that thread. Each thread's first call (its request's creation included) is
    made under one process-wide lock, after `import_openvino`'s warm-up: no two threads are ever
    inside first calls at once, so whatever the bindings initialise lazily on that path is first
    reached by one thread while no other thread is inferring (two first calls at once are the
    `Tensor.data` deadlock). `bench/ov_stress.py` measures the hang rate with and without."""

    def __init__(self, compiled, max_batch: int | None) -> None:
        self.compiled = compiled
        self.streams = max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS") or 1))
        self._busy = threading.BoundedSemaphore(self.streams)
        self._own = threading.local()  # .request: this thread's infer request
        self.input_names = [i.get_any_name() for i in compiled.inputs]
        self.output_names = [o.get_any_name() for o in compiled.outputs]
        self.max_batch = max_batch

    def run_stream(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with self._busy:
            request = getattr(self._own, "request", None)
            if request is not None:
                return run_chunked(lambda part: self._infer(request, part), feeds, self.max_batch)
            with _FIRST_CALL_LOCK:
                request = self.compiled.create_infer_request()
                out = run_chunked(lambda part: self._infer(request, part), feeds, self.max_batch)
                self._own.request = request  # kept only once a call on it succeeded
                return out

    def _infer(self, request, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        import numpy as np

        request.infer(feeds, share_inputs=False)
        # A request reuses its output buffers: copy before its next call overwrites them.
        return [np.array(request.get_output_tensor(i).data, copy=True)
                for i in range(len(self.output_names))]
