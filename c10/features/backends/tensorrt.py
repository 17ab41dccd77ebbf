"""TensorRT backend, written against the TensorRT 10 API (never run: no GPU on the build hosts).

What has been exercised: availability, version probing, the fingerprint's shape, key and
selection logic (tests fake NVML's answers). What has NOT been run anywhere yet: the NVML
probe, `_compile` (parser, builder config, INT8 calibrator, profile, timing cache) and
`TrtRunner`. Treat them as unverified until a GPU host runs tests/features/test_backends.py.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from c10.errors import EngineBuildError
from c10.features.backends import (
    Backend,
    Runner,
    os_arch,
    package_dir,
    package_version,
    run_chunked,
)
from c10.store.atomic import write_bytes

if TYPE_CHECKING:
    import numpy as np

    from c10.features.engines import EngineSpec, ModelInfo

_DISTS = ("tensorrt_cu13_bindings", "tensorrt_cu12_bindings", "tensorrt_bindings",
          "tensorrt_cu13", "tensorrt_cu12", "tensorrt")
HARDWARE_COMPAT = ("none", "ampere_plus", "same_compute_capability")


class TensorRTBackend(Backend):
    """TensorRT on an NVIDIA GPU: fp32/fp16/bf16, and int8 from the request's calibration cache."""

    name = "tensorrt"
    suffix = ".plan"
    install_hint = ("needs an NVIDIA GPU with its driver, then pip install 'c10[tensorrt]' "
                    "(tensorrt, nvidia-ml-py, cuda-python)")
    precisions = ("fp32", "fp16", "bf16", "int8")

    def __init__(self, timing_cache_dir: Path | None = None, hardware_compat: str = "none",
                 version_compatible: bool = False, device: int = 0) -> None:
        if hardware_compat not in HARDWARE_COMPAT:
            raise EngineBuildError(f"TensorRT hardware_compat {hardware_compat!r} is unknown; "
                                   f"allowed: {', '.join(HARDWARE_COMPAT)}")
        self.timing_cache_dir = (Path(timing_cache_dir) if timing_cache_dir
                                 else _default_timing_dir())
        self.hardware_compat = hardware_compat
        self.version_compatible = version_compatible
        self.device = device

    def available(self) -> bool:
        return (importlib.util.find_spec("tensorrt") is not None
                and importlib.util.find_spec("pynvml") is not None and _gpu_present())

    def version(self) -> str:
        return package_version("tensorrt", _DISTS) or "unknown"

    def _fingerprint(self) -> dict:
        gpu = self.gpu()
        return {"sm": gpu["sm"], "cuda": cuda_version(), "tensorrt": self.version(),
                "os_arch": os_arch(), "hardware_compat": self.hardware_compat,
                "version_compatible": self.version_compatible}

    def host_metadata(self) -> dict:
        gpu = self.gpu()
        return {**super().host_metadata(), "gpu": gpu["name"], "driver": gpu["driver"],
                "cuda_driver": gpu["cuda_driver"]}

    def gpu(self) -> dict:
        """Compute capability, name and driver of the GPU from NVML (once per backend)."""
        if "_gpu" not in self.__dict__:
            self.__dict__["_gpu"] = _nvml_probe(self.device)
        return self.__dict__["_gpu"]

    def timing_cache_path(self) -> Path:
        fp = self.host_fingerprint()
        return self.timing_cache_dir / (f"timing-trt{fp['tensorrt']}-{fp['sm']}"
                                        f"-cuda{fp['cuda']}.cache")

    def _compile(self, spec: EngineSpec, model: ModelInfo, calibration: bytes | None,
                 out: Path) -> dict:
        import tensorrt as trt

        logger = _logger(trt)
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(spec.onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineBuildError(f"TensorRT's ONNX parser rejected {spec.onnx_path}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_mb << 20)
        profile = self._profile(trt, builder, network, spec)
        config.add_optimization_profile(profile)
        self._precision(trt, config, spec, model, calibration, profile)
        if self.hardware_compat != "none":
            config.hardware_compatibility_level = getattr(
                trt.HardwareCompatibilityLevel, self.hardware_compat.upper())
        if self.version_compatible:
            config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        timing_path = self.timing_cache_path()
        timing_bytes = timing_path.read_bytes() if timing_path.is_file() else b""
        config.set_timing_cache(config.create_timing_cache(timing_bytes), False)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise EngineBuildError(f"TensorRT could not build {spec.onnx_path}: {logger.errors()}")
        write_bytes(out, bytes(memoryview(plan)))
        write_bytes(timing_path, bytes(memoryview(config.get_timing_cache().serialize())))
        return {"tensorrt": trt.__version__, "timing_cache": str(timing_path)}

    def _profile(self, trt, builder, network, spec: EngineSpec):
        """One optimization profile: the batch dim from spec.batch, the image dims from
        input_shape."""
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            dims = list(tensor.shape)
            if i == 0 and spec.input_shape is not None:
                dims = [dims[0], *spec.input_shape]
            if any(d < 0 for d in dims[1:]):
                raise EngineBuildError(
                    f"{spec.onnx_path}: input {tensor.name!r} has dynamic dimensions {dims} that "
                    f"TensorRT needs fixed; set models.{spec.model}.input_size in c10.toml")
            shapes = [[b if dims[0] < 0 else dims[0], *dims[1:]] for b in spec.batch]
            profile.set_shape(tensor.name, *shapes)
        return profile

    def _precision(self, trt, config, spec, model, calibration, profile) -> None:
        if spec.precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif spec.precision == "bf16":
            config.set_flag(trt.BuilderFlag.BF16)
        elif spec.precision == "int8":
            from c10.features.engines import check_calibration_for

            check_calibration_for(spec, calibration, model.input_names)
            # FP16 too: layers the cache does not cover fall back to fp16, not fp32.
            config.set_flag(trt.BuilderFlag.INT8)
            config.set_flag(trt.BuilderFlag.FP16)
            config.int8_calibrator = _calibrator(trt, calibration)
            config.set_calibration_profile(profile)

    def _load(self, data: bytes, spec: EngineSpec) -> Runner:
        import tensorrt as trt

        runtime = trt.Runtime(_logger(trt))
        engine = runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise EngineBuildError(f"TensorRT could not deserialize the engine of {spec.model}",
                                   f"delete it and rebuild with `doit engines:{spec.model}`")
        return TrtRunner(trt, engine, spec.batch[2])


def _calibrator(trt, cache: bytes):
    """An entropy calibrator that only serves the request's cache: no images are read at build."""

    class CacheCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            super().__init__()

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names):
            return None  # no calibration data: TensorRT must take every scale from the cache

        def read_calibration_cache(self):
            return cache

        def write_calibration_cache(self, data) -> None:
            return None  # the cache is an input of the build, never rewritten by it

    return CacheCalibrator()


def _logger(trt):
    """A TensorRT logger that keeps the errors for the EngineBuildError message."""

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[str] = []

        def log(self, severity, msg) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.messages.append(msg)

        def errors(self) -> str:
            return "; ".join(self.messages[-5:]) or "no error logged"

    return Logger()


class TrtRunner(Runner):
    """Runs a plan with cuda-python buffers; device buffers grow to the largest batch seen."""

    def __init__(self, trt, engine, max_batch: int) -> None:
        self.trt, self.engine, self.max_batch = trt, engine, max_batch
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.input_names = [n for n in names if engine.get_tensor_mode(n) == mode]
        self.output_names = [n for n in names if engine.get_tensor_mode(n) != mode]
        self.cudart = _cudart()
        self.stream = _cuda(self.cudart.cudaStreamCreate())
        self.buffers: dict[str, tuple[int, int]] = {}
        self._busy = threading.Lock()  # one execution context and stream: calls take turns

    def run_stream(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with self._busy:
            return run_chunked(self._run, feeds, self.max_batch)

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        import numpy as np

        rt = self.cudart
        for name in self.input_names:
            dtype = self.trt.nptype(self.engine.get_tensor_dtype(name))
            array = np.ascontiguousarray(feeds[name], dtype=dtype)
            self.context.set_input_shape(name, array.shape)
            ptr = self._buffer(name, array.nbytes)
            _cuda(rt.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes,
                                     rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))
        outputs = []
        for name in self.output_names:
            dtype = self.trt.nptype(self.engine.get_tensor_dtype(name))
            host = np.empty(tuple(self.context.get_tensor_shape(name)), dtype=dtype)
            self._buffer(name, host.nbytes)
            outputs.append(host)
        if not self.context.execute_async_v3(self.stream):
            raise EngineBuildError("TensorRT execution failed (see the TensorRT log)")
        for name, host in zip(self.output_names, outputs):
            _cuda(rt.cudaMemcpyAsync(host.ctypes.data, self.buffers[name][0], host.nbytes,
                                     rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
        _cuda(rt.cudaStreamSynchronize(self.stream))
        return outputs

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self.buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                _cuda(self.cudart.cudaFree(ptr))
            ptr, size = _cuda(self.cudart.cudaMalloc(nbytes)), nbytes
            self.buffers[name] = (ptr, size)
        self.context.set_tensor_address(name, ptr)
        return ptr


def _cudart():
    try:
        from cuda.bindings import runtime
    except ImportError:
        from cuda import cudart as runtime  # cuda-python < 12.6
    return runtime


def _cuda(result):
    """cuda-python returns (err, *values): raise on err, unwrap a single value."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise EngineBuildError(f"CUDA call failed: {err}")
    return values[0] if len(values) == 1 else tuple(values)


# --- host probing -------------------------------------------------------------------------

def _gpu_present() -> bool:
    if sys.platform == "win32":
        return True  # no cheap device node to look at; NVML decides in the fingerprint
    return os.path.exists("/dev/nvidiactl") or os.path.isdir("/proc/driver/nvidia/gpus")


def _nvml_probe(index: int) -> dict:
    """NVML's view of the GPU. NVML ignores CUDA_VISIBLE_DEVICES, so honour it here."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = _nvml_handle(pynvml, index)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            driver = pynvml.nvmlSystemGetDriverVersion()
            cuda_driver = pynvml.nvmlSystemGetCudaDriverVersion()
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:
        raise EngineBuildError(f"NVML could not describe GPU {index} "
                               f"({type(exc).__name__}: {exc}); "
                               "check `nvidia-smi`, or set engines.backend = \"openvino\"") from exc
    return {"sm": f"sm_{major}{minor}", "name": _text(name), "driver": _text(driver),
            "cuda_driver": f"{cuda_driver // 1000}.{cuda_driver % 1000 // 10}"}


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)  # old pynvml gives bytes


def _nvml_handle(pynvml, index: int):
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
               if v.strip()]
    if len(visible) > index:
        chosen = visible[index]
        if not chosen.isdigit():
            return pynvml.nvmlDeviceGetHandleByUUID(chosen)
        index = int(chosen)
    return pynvml.nvmlDeviceGetHandleByIndex(index)


@functools.cache
def cuda_version() -> str:
    """CUDA runtime version: the nvidia wheel beside TensorRT, else the toolkit, else TensorRT's
    major."""
    pkg = package_dir("tensorrt")
    site = pkg.parent if pkg else None
    if site is not None:
        for entry in sorted(os.listdir(site)):
            if entry.startswith("nvidia_cuda_runtime_cu") and entry.endswith(".dist-info"):
                return entry[: -len(".dist-info")].split("-", 1)[1]
    try:
        return json.loads(Path("/usr/local/cuda/version.json").read_text())["cuda"]["version"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    for dist in ("tensorrt_cu13", "tensorrt_cu12", "tensorrt_cu11"):
        if site is not None and any(e.startswith(dist + "-") for e in os.listdir(site)):
            return dist[-2:]
    return "unknown"


def _default_timing_dir() -> Path:
    """Timing caches are per host, not per cache directory: keep them out of CACHE."""
    if os.environ.get("C10_TRT_TIMING_CACHE_DIR"):
        return Path(os.environ["C10_TRT_TIMING_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "c10" / "tensorrt"
