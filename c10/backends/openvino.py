"""OpenVINO backend: a CPU-compiled model exported as a blob, tied to the CPU's ISA and OpenVINO version."""
from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from c10.atomic import write_bytes
from c10.backends import Backend, Runner, cpu_info, os_arch, package_version, run_chunked

if TYPE_CHECKING:
    import numpy as np

    from c10.engines import EngineSpec, ModelInfo

# The ISA extensions the OpenVINO CPU plugin dispatches on (x86 and ARM spellings).
_ISA = re.compile(r"^(sse4_[12]|avx|avx2|fma|f16c|avx512.*|amx.*|avx_vnni.*|avxvnni.*|avx_ne_convert"
                  r"|asimd.*|fphp|sve.*|bf16|i8mm)$")
_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
# Measured on the shared 2-core build machine (bench/engines.py, demo global model, batch 32,
# interleaved windows): in quiet windows a batch split over THROUGHPUT's 2 streams and one
# LATENCY request on both cores tie (~420 img/s); with other jobs on the machine (the
# median window, and the real case while tiles decode beside inference) the split was
# ~1.3x faster. Batch 1 is slower with it (one stream), which tile embedding never uses.
# The hint is applied again on import, so it is not part of the engine key.
DEFAULT_HINT = "THROUGHPUT"


class OpenVinoBackend(Backend):
    """OpenVINO on the CPU; fp32, bf16 or fp16 inference precision (int8 only via TensorRT)."""

    name = "openvino"
    suffix = ".blob"
    install_hint = "pip install 'c10[openvino]' (or: pip install openvino)"
    precisions = ("fp32", "bf16", "fp16")

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

    def core(self):
        if self._core is None:
            import openvino as ov
            self._core = ov.Core()
        return self._core

    def _compile(self, spec: EngineSpec, model: ModelInfo, calibration: bytes | None,
                 out: Path) -> dict:
        import openvino as ov

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
        compiled = core.compile_model(network, "CPU", config)
        blob = compiled.export_model()
        write_bytes(out, blob.getvalue() if hasattr(blob, "getvalue") else bytes(blob))
        actual = compiled.get_property("INFERENCE_PRECISION_HINT")
        # The CPU may substitute (e.g. f16 runs as bf16 without avx512_fp16): record what runs.
        return {"inference_precision": getattr(actual, "get_type_name", lambda: str(actual))(),
                "requested_precision": _PRECISION[spec.precision],
                "openvino_build": ov.get_version(), "performance_hint": self.performance_hint}

    def _load(self, path: Path, spec: EngineSpec) -> Runner:
        # An imported blob does not keep its inference precision: without the hint it runs the
        # CPU's default (bf16 with AMX), ~3e-3 off an f32 engine.
        compiled = self.core().import_model(path.read_bytes(), "CPU",
                                            {"PERFORMANCE_HINT": self.performance_hint,
                                             "INFERENCE_PRECISION_HINT": _PRECISION[spec.precision]})
        return OvRunner(compiled, spec.batch[2] if spec.input_shape is not None else None)


class OvRunner(Runner):
    """Splits each batch over the compiled model's optimal number of requests (one per stream)."""

    def __init__(self, compiled, max_batch: int | None) -> None:
        self.compiled = compiled
        streams = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS") or 1)
        self.requests = [compiled.create_infer_request() for _ in range(max(1, streams))]
        self.input_names = [i.get_any_name() for i in compiled.inputs]
        self.output_names = [o.get_any_name() for o in compiled.outputs]
        self.max_batch = max_batch
        # Infer requests are not reentrant: `doit -n N` shard threads take turns (each call
        # already keeps every core busy through the streams).
        self._busy = threading.Lock()

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with self._busy:
            return run_chunked(self._run, feeds, self.max_batch)

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        import numpy as np

        # Split along the batch only when every input shares it (a matcher's may not).
        lengths = {len(v) for v in feeds.values()}
        n = next(iter(lengths)) if len(lengths) == 1 else 0
        parts = max(1, min(len(self.requests), n))
        bounds = np.linspace(0, n, parts + 1).astype(int)
        used = self.requests[:parts]
        for request, lo, hi in zip(used, bounds[:-1], bounds[1:]):
            chunk = feeds if parts == 1 else {k: v[lo:hi] for k, v in feeds.items()}
            request.start_async(chunk, share_inputs=False)
        for request in used:
            request.wait()
        # Requests reuse their output buffers: copy before the next call overwrites them.
        outs = [[np.array(r.get_output_tensor(i).data, copy=True) for r in used]
                for i in range(len(self.output_names))]
        return [o[0] if parts == 1 else np.concatenate(o) for o in outs]
