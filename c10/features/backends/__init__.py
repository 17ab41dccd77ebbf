"""The engine backend interface, cheap host probing and backend selection (no heavy imports)."""
from __future__ import annotations

import functools
import importlib.util
import os
import platform
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from c10.errors import C10Error, ConfigError, EngineBuildError

if TYPE_CHECKING:  # numpy and the specs only for annotations: keep graph loading light
    import numpy as np

    from c10.features.engines import EngineSpec, ModelInfo

# auto picks the first available, best first (issue 3).
AUTO_ORDER = ("tensorrt", "openvino", "onnxruntime")
_VERSION_RE = re.compile(r"""^__version__\s*=\s*["']([^"']+)["']""", re.M)


class Runner:
    """A loaded engine. `run_stream(feeds)` runs one call on one of its `streams` (a core, an
    OpenVINO request, a CUDA stream), waiting while all are busy; `run(feeds)` splits a batch
    over every stream; `runner(batch)` and `runner.stream(batch)` give the first output of each.

    Throughput comes from several calls at once, one per stream, not from one call spread over
    every core: an op spread over the cores waits for its slowest thread, and the thread that
    shares its core with a tile being decoded is always the slowest (bench/embed.py)."""

    input_names: list[str]
    output_names: list[str]
    streams = 1

    def run_stream(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Every output for `feeds`, a batch split over the streams (rows are independent)."""
        from c10.features.pools import worker_pool

        chunks = split_batch(feeds, self.streams)
        rest = [worker_pool("streams", self.streams - 1).submit(self.run_stream, c)
                for c in chunks[1:]]
        first = self.run_stream(chunks[0])  # the caller's thread runs one part itself
        return join_outputs([first, *(f.result() for f in rest)])

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.run(self._feeds(batch))[0]

    def stream(self, batch: np.ndarray) -> np.ndarray:
        """The first output of one call on one stream: what each embedding worker runs."""
        return self.run_stream(self._feeds(batch))[0]

    def _feeds(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if len(self.input_names) != 1:
            raise EngineBuildError(
                f"this engine has {len(self.input_names)} inputs {self.input_names}; "
                "call runner.run({name: array, ...}) instead of runner(batch)")
        return {self.input_names[0]: batch}


def split_batch(feeds: dict, parts: int) -> list[dict]:
    """`feeds` cut along the batch into at most `parts` near-equal chunks; whole when the inputs
    do not share a batch length (a matcher's may not)."""
    lengths = {len(v) for v in feeds.values()}
    parts = min(parts, next(iter(lengths))) if len(lengths) == 1 else 1
    if parts <= 1:
        return [feeds]
    n = lengths.pop()
    bounds = [n * i // parts for i in range(parts + 1)]
    return [{k: v[lo:hi] for k, v in feeds.items()} for lo, hi in zip(bounds, bounds[1:])]


def join_outputs(results: list[list]) -> list:
    """The outputs of calls on consecutive chunks of one batch, joined along the batch."""
    if len(results) == 1:
        return results[0]
    import numpy as np

    return [np.concatenate(outs) for outs in zip(*results)]


def run_chunked(run, feeds: dict, max_batch: int | None) -> list:
    """Split a batch larger than the engine's profile into profile-sized calls."""
    sizes = {len(v) for v in feeds.values()}
    if max_batch is None or len(sizes) != 1:
        return run(feeds)
    return join_outputs([run(chunk) for chunk in split_batch(feeds, -(-sizes.pop() // max_batch))])


class Backend:
    """One way to compile an ONNX into a host-tied engine and to run it.

    `available`, `version` and `host_fingerprint` run while the doit graph loads: they
    must never import the backend's library (see `package_version`, `cpu_info`).
    """

    name = ""
    suffix = ""
    install_hint = ""
    precisions: tuple[str, ...] = ("fp32",)

    def available(self) -> bool:
        return importlib.util.find_spec(self.name) is not None

    def version(self) -> str:
        raise NotImplementedError

    def host_fingerprint(self) -> dict:
        """Key-relevant device identity, JSON-able; computed once per backend object."""
        cached = self.__dict__.get("_fingerprint")
        if cached is None:
            cached = self._fingerprint()
            self.__dict__["_fingerprint"] = cached
        return cached

    def _fingerprint(self) -> dict:
        raise NotImplementedError

    def quantizer(self) -> dict | None:
        """How this backend quantizes an INT8 engine itself (tool, version, settings), for the
        engine key; None when INT8 comes from a calibration cache alone (TensorRT)."""
        return None

    def host_metadata(self) -> dict:
        """What describes the host but must not invalidate engines (Manifest metadata)."""
        return {"platform": platform.platform(), "cpu": cpu_info()["model"], "cpus": os.cpu_count()}

    def compile(self, spec: EngineSpec, out: Path) -> dict:
        """Validate the request, compile it, write `out` atomically; return build info for the
        sidecar."""
        from c10.features.engines import inspect_model, read_calibration

        self.require_available()
        model = inspect_model(spec)
        calibration = read_calibration(spec)
        if spec.precision not in self.precisions:
            raise EngineBuildError(
                f"models.{spec.model}.precision = {spec.precision!r} is not supported by the "
                f"{self.name} backend (it supports {', '.join(self.precisions)}); change "
                f"models.{spec.model}.precision or engines.backend in c10.toml")
        try:
            return self._compile(spec, model, calibration, Path(out)) or {}
        except C10Error:
            raise
        except Exception as exc:  # the backend's own failure, passed on with its message
            raise EngineBuildError(
                f"{self.name} {self.version()} could not compile {spec.onnx_path} "
                f"(model {spec.model!r}): {type(exc).__name__}: {exc}") from exc

    def _compile(self, spec: EngineSpec, model: ModelInfo, calibration: bytes | None,
                 out: Path) -> dict | None:
        raise NotImplementedError

    def load(self, source: Path | bytes, spec: EngineSpec, where: str | None = None) -> Runner:
        """The engine at `source` (a path, or its bytes already read and checked: the aircraft
        loads exactly the bytes it verified)."""
        self.require_available()
        where = where or str(source if not isinstance(source, bytes) else spec.model)
        try:
            data = source if isinstance(source, bytes) else Path(source).read_bytes()
            return self._load(data, spec)
        except C10Error:
            raise
        except Exception as exc:
            raise EngineBuildError(
                f"{self.name} could not load the engine {where}: {type(exc).__name__}: {exc}",
                f"delete it and rebuild with `doit engines:{spec.model}`", then="") from exc

    def _load(self, data: bytes, spec: EngineSpec) -> Runner:
        raise NotImplementedError

    def require_available(self) -> None:
        if not self.available():
            raise EngineBuildError(
                f"engine backend {self.name!r} is not available on this host: "
                f"{self.install_hint}, or set engines.backend = \"auto\" in c10.toml")


def get_backend(name: str, **options: Any) -> Backend:
    """The backend called `name`; "auto" is the first available of AUTO_ORDER.

    Unknown name -> ConfigError; a named backend that is not available -> EngineBuildError
    saying how to install it. Options go to the backend's constructor (e.g. TensorRT's
    `timing_cache_dir`); backends without options are shared, so fingerprints are probed once.
    """
    if name == "auto":
        for candidate in AUTO_ORDER:
            backend = _make(candidate, options)
            if backend.available():
                return backend
        raise EngineBuildError("no engine backend is available: pip install onnxruntime")
    if name not in AUTO_ORDER:
        raise ConfigError(
            f"c10.toml engines.backend = {name!r} is unknown; allowed: auto, "
            + ", ".join(AUTO_ORDER))
    backend = _make(name, options)
    backend.require_available()
    return backend


def host_fingerprints() -> dict:
    """This host's fingerprint per available backend (what airborne mode compares engines with)."""
    out = {}
    for name in AUTO_ORDER:
        try:
            out[name] = get_backend(name).host_fingerprint()
        except C10Error:
            continue  # not installed here: an engine of that backend cannot run on this host
    return out


def _make(name: str, options: dict) -> Backend:
    if options:
        return _backend_class(name)(**options)
    return _shared(name)


@functools.cache
def _shared(name: str) -> Backend:
    return _backend_class(name)()


def _backend_class(name: str) -> type[Backend]:
    if name == "onnxruntime":
        from c10.features.backends.onnxruntime import OnnxRuntimeBackend
        return OnnxRuntimeBackend
    if name == "openvino":
        from c10.features.backends.openvino import OpenVinoBackend
        return OpenVinoBackend
    from c10.features.backends.tensorrt import TensorRTBackend
    return TensorRTBackend


# --- cheap host probing: no imports of the heavy libraries, no importlib.metadata ---------

def package_dir(module: str) -> Path | None:
    """The directory of an installed top-level package, located without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@functools.cache
def package_version(module: str, dists: tuple[str, ...] = ()) -> str | None:
    """Version of `module` from a `*.dist-info` beside it (first of `dists`), else its
    `__version__` line."""
    pkg = package_dir(module)
    if pkg is None:
        return None
    try:
        names = {p.split("-", 1)[0].lower(): p
                 for p in os.listdir(pkg.parent) if p.endswith(".dist-info")}
    except OSError:
        names = {}
    for dist in dists or (module,):
        entry = names.get(dist.lower().replace("-", "_"))
        if entry:
            return entry[: -len(".dist-info")].split("-", 1)[1]
    for candidate in (pkg / "__init__.py", pkg / "version.py", pkg / "_version.py"):
        match = _VERSION_RE.search(_read_text(candidate))
        if match:
            return match.group(1)
    return None


@functools.cache
def cpu_info() -> dict:
    """CPU model name and ISA flags of the first processor in /proc/cpuinfo (fallback: platform)."""
    text = _read_text(Path("/proc/cpuinfo")).split("\n\n", 1)[0]
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    model = (fields.get("model name") or fields.get("hardware") or fields.get("cpu model")
             or _arm_model(fields) or platform.processor() or platform.machine())
    flags = (fields.get("flags") or fields.get("features") or "").split()
    return {"model": model, "flags": sorted(set(flags))}


def _arm_model(fields: dict[str, str]) -> str:
    # ARM kernels print no model name: implementer + part identify the core.
    if "cpu implementer" in fields:
        return f"arm implementer {fields['cpu implementer']} part {fields.get('cpu part', '?')}"
    return ""


def os_arch() -> str:
    return f"{sys.platform}-{platform.machine().lower()}"


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
