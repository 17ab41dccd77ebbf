"""Engines: identity keys, build-or-reuse with a sidecar, and loading checked against this host."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import blake3

from c10.canonical import canonical_json, digest
from c10.errors import (
    CalibrationCacheError,
    ConfigError,
    EngineBuildError,
    EngineMismatchError,
    ModelError,
)
from c10.features.backends import AUTO_ORDER, Backend, Runner, get_backend
from c10.store.atomic import move_into, write_text
from c10.store.digest import blake3_file
from c10.store.layout import ENGINES_DIR, STAGING_DIR

__all__ = ["EngineSpec", "ModelInfo", "Backend", "Runner", "get_backend", "engine_key",
           "key_material", "engine_path", "sidecar_path", "build_engine", "load_engine",
           "inspect_model", "read_calibration", "AUTO_ORDER", "SCHEMA_VERSION"]

# Bump when the key material, its bytes or the engine layout change: every engine is rebuilt once
# (2: the key is c10.canonical's JSON, UTF-8 instead of ASCII escapes).
SCHEMA_VERSION = 2
PRECISIONS = ("fp32", "fp16", "bf16", "int8")


@dataclass(frozen=True)
class EngineSpec:
    """Everything that decides an engine, as the build graph hands it over."""

    model: str
    onnx_path: Path
    onnx_hash: str
    input_shape: tuple[int, ...] | None
    precision: str = "fp32"
    workspace_mb: int = 1024
    batch: tuple[int, int, int] = (1, 32, 64)
    calibration_path: Path | None = None
    calibration_hash: str | None = None
    # INT8 on ONNX Runtime and OpenVINO (c10.features.int8): the sample tiles, the held-out
    # tiles of the accuracy gate (absolute paths), their preprocessing (input_size, mean, std,
    # channel_order, resize, decode) and the gate's thresholds. Not key material: the sample is by
    # calibration_hash.
    calibration_tiles: tuple[str, ...] = ()
    holdout_tiles: tuple[str, ...] = ()
    preprocess: tuple | None = None
    int8_min_cosine: float = 0.99
    int8_max_recall_drop: float = 0.01
    # a local model's gate (c10.features.int8_local): the sector's matcher ONNX (None: mutual
    # nearest descriptors) and the share of fp32's correct matches INT8 must keep
    role: str = "global"
    gate_matcher: str | None = None
    int8_min_match_retention: float = 0.85

    def __post_init__(self) -> None:
        object.__setattr__(self, "onnx_path", Path(self.onnx_path))
        if self.precision not in PRECISIONS:
            raise ConfigError(f"c10.toml models.{self.model}.precision = {self.precision!r} is "
                              f"unknown; allowed: {', '.join(PRECISIONS)}")
        if len(self.batch) != 3 or not 1 <= self.batch[0] <= self.batch[1] <= self.batch[2]:
            raise ConfigError(f"engine batch profile {self.batch} for model {self.model!r} must "
                              "satisfy 1 <= min <= opt <= max")


@dataclass(frozen=True)
class ModelInfo:
    """What the backends need to know about an ONNX graph (read once, before compiling)."""

    inputs: tuple[tuple[str, tuple[int | None, ...]], ...]   # None = dynamic dimension
    outputs: tuple[str, ...]
    ir_version: int
    opset: int

    @property
    def input_names(self) -> list[str]:
        return [name for name, _ in self.inputs]


def key_material(spec: EngineSpec, backend: Backend) -> dict:
    """Everything that makes an engine valid, and nothing else (not the ONNX's path or name)."""
    int8 = spec.precision == "int8"
    material = {
        "schema": SCHEMA_VERSION,
        "onnx_hash": spec.onnx_hash,
        "backend": backend.name,
        "backend_version": backend.version(),
        "host": backend.host_fingerprint(),
        "precision": spec.precision,
        # A calibration cache only shapes an INT8 engine; elsewhere it must not force a rebuild.
        "calibration_hash": spec.calibration_hash if int8 else None,
        "workspace_mb": spec.workspace_mb,
        "input_shape": list(spec.input_shape) if spec.input_shape is not None else None,
        "batch": list(spec.batch),
    }
    quantizer = backend.quantizer() if int8 else None
    if quantizer is not None:  # only in INT8 keys: every other engine keeps its key
        material["quantizer"] = quantizer
    return material


def engine_key(spec: EngineSpec, backend: Backend) -> str:
    """sha256 hex of the canonical JSON of `key_material`."""
    return digest(key_material(spec, backend))


def engine_path(engines_dir: Path, spec: EngineSpec, backend: Backend) -> Path:
    return Path(engines_dir) / f"{spec.model}-{engine_key(spec, backend)}{backend.suffix}"


def sidecar_path(engine: Path) -> Path:
    return Path(engine).with_suffix(".json")


def build_engine(spec: EngineSpec, backend: Backend, engines_dir: Path,
                 written: Callable[[dict[str, str]], None] | None = None) -> tuple[Path, bool]:
    """Reuse the engine for this key if it and its sidecar exist, else compile it: (path, built).

    The engine is compiled in .c10/tmp/ and moved in after its sidecar, which records its blake3:
    whatever a kill leaves in engines/ proves itself to `c10 verify` (a pending engine).
    `written({file name: blake3})` hears of both files before either appears (the build's ledger
    records them first: a kill can leave nothing in engines/ the ledger does not know)."""
    path = engine_path(engines_dir, spec, backend)
    material = key_material(spec, backend)
    key = engine_key(spec, backend)
    existing = _read_sidecar(sidecar_path(path))
    if path.is_file() and existing.get("key") == key:
        gate = (existing.get("build") or {}).get("int8_gate")
        if gate:  # thresholds are not key material: the recorded figures meet today's
            from c10.features.int8 import check_gate

            check_gate(spec, gate)
        return path, False
    staged = Path(engines_dir).parent / STAGING_DIR / ENGINES_DIR / path.name
    staged.parent.mkdir(parents=True, exist_ok=True)
    info = backend.compile(spec, staged)
    sidecar = {
        "key": key,
        "model": spec.model,
        "material": material,
        "host_metadata": backend.host_metadata(),
        "build": info or {},
        "engine_size": staged.stat().st_size,
        "engine_blake3": blake3_file(staged),
    }
    text = json.dumps(sidecar, sort_keys=True, indent=2) + "\n"
    if written is not None:
        written({path.name: sidecar["engine_blake3"],
                 sidecar_path(path).name: blake3.blake3(text.encode()).hexdigest()})
    write_text(sidecar_path(path), text, staging=staged.parent)
    move_into(staged, path)
    return path, True


def load_engine(path: Path, spec: EngineSpec, backend: Backend) -> Runner:
    """Load an engine after checking its sidecar: another host's engine is EngineMismatchError."""
    path = Path(path)
    rebuild = f"rebuild it with `doit engines:{spec.model}`"
    sidecar = _read_sidecar(sidecar_path(path))
    if not path.is_file() or not sidecar:
        raise EngineBuildError(f"engine {path} or its sidecar {sidecar_path(path).name} is "
                               f"missing or unreadable; {rebuild}")
    built = sidecar.get("material", {})
    here = key_material(spec, backend)
    built_host = {k: built.get(k) for k in ("backend", "backend_version", "host")}
    this_host = {k: here[k] for k in ("backend", "backend_version", "host")}
    if built_host != this_host:
        raise EngineMismatchError(
            f"engine {path} was built for another host or backend; built for "
            f"{canonical_json(built_host).decode()}, "
            f"this host is {canonical_json(this_host).decode()}; "
            f"{rebuild} on this host")
    if sidecar.get("key") != engine_key(spec, backend):
        changed = sorted(k for k in here if built.get(k) != here[k])
        raise EngineMismatchError(
            f"engine {path} was built for another request (differs in: {', '.join(changed)}); "
            f"{rebuild}")
    return backend.load(path, spec)


def load_signed_engine(model: str, engine: bytes, sidecar: bytes, key: str,
                       backend: Backend) -> Runner:
    """An engine as the aircraft loads it: bytes already checked against the Manifest, its
    sidecar's key material hashing to the signed key, built for this host (no c10.toml, no
    ONNX: everything comes from the signed files)."""
    from c10.trust.strictjson import StrictJSONError, strict_loads

    try:
        side = strict_loads(sidecar, max_depth=8)
        material = side["material"]
        ok = side.get("key") == key == digest(material)
    except (StrictJSONError, KeyError, TypeError):
        ok = False
    if not ok:
        raise EngineMismatchError(f"the sidecar of model {model}'s engine does not hash to the "
                                  "signed engine key", "rebuild the cache with `doit build_cache`")
    this_host = {"backend": backend.name, "backend_version": backend.version(),
                 "host": backend.host_fingerprint()}
    built_host = {k: material.get(k) for k in this_host}
    if built_host != this_host:
        raise EngineMismatchError(
            f"the engine of model {model} was built for {canonical_json(built_host).decode()}, "
            f"this host is {canonical_json(this_host).decode()}",
            "build the cache on this platform with `doit build_cache`")
    shape = material.get("input_shape")
    spec = EngineSpec(model=model, onnx_path=Path(model), onnx_hash=material["onnx_hash"],
                      input_shape=tuple(shape) if shape else None, precision=material["precision"],
                      workspace_mb=material["workspace_mb"], batch=tuple(material["batch"]),
                      calibration_hash=material.get("calibration_hash"))
    return backend.load(engine, spec, where=f"the engine of model {model}")


def _read_sidecar(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# --- checks shared by every backend's compile ---------------------------------------------

def inspect_model(spec: EngineSpec) -> ModelInfo:
    """Parse and check the ONNX; its first input must agree with spec.input_shape."""
    import onnx  # heavy: only when compiling

    path = spec.onnx_path
    if not path.is_file():
        raise ModelError(f"{path}: the ONNX of model {spec.model!r} does not exist; fix "
                         f"models.{spec.model}.path in c10.toml")
    try:
        proto = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ModelError(f"{path} is not a valid ONNX model ({type(exc).__name__}: {exc}); "
                         f"re-export model {spec.model!r} to ONNX") from exc
    info = _model_info(proto)
    if not info.inputs or not info.outputs:
        raise ModelError(f"{path} has no graph inputs or outputs; re-export model {spec.model!r}")
    _check_input_shape(spec, info)
    return info


def _model_info(proto) -> ModelInfo:
    weights = {init.name for init in proto.graph.initializer}
    inputs = tuple((vi.name, tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0
                                   else None for d in vi.type.tensor_type.shape.dim))
                   for vi in proto.graph.input if vi.name not in weights)
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    return ModelInfo(inputs, tuple(o.name for o in proto.graph.output), proto.ir_version, opset)


def _check_input_shape(spec: EngineSpec, info: ModelInfo) -> None:
    if spec.input_shape is None:
        return
    name, dims = info.inputs[0]
    want = tuple(spec.input_shape)
    fits = len(dims) == len(want) + 1 and all(d is None or d == w for d, w in zip(dims[1:], want))
    if not fits:
        shown = ", ".join("N" if d is None else str(d) for d in dims)
        raise ModelError(
            f"{spec.onnx_path}: input {name!r} has shape [{shown}] but c10.toml asks for "
            f"[N, {', '.join(map(str, want))}]; fix models.{spec.model}.input_size in c10.toml "
            "or re-export the ONNX at that size")


def read_calibration(spec: EngineSpec) -> bytes | None:
    """The INT8 calibration cache bytes (None unless int8); missing/unreadable ->
    CalibrationCacheError."""
    if spec.precision != "int8" or (spec.calibration_path is None and spec.calibration_tiles):
        return None  # ONNX Runtime calibrates on the cache's own tiles (c10.features.int8)
    where = f"models.{spec.model}.calibration"
    if spec.calibration_path is None:
        raise CalibrationCacheError(
            f"model {spec.model!r} has precision int8 but no calibration cache; set {where} "
            "in c10.toml to a TensorRT calibration cache, or use precision fp16/fp32")
    try:
        data = Path(spec.calibration_path).read_bytes()
    except OSError as exc:
        raise CalibrationCacheError(
            f"{spec.calibration_path}: cannot read the INT8 calibration cache of model "
            f"{spec.model!r} ({exc.strerror or exc}); fix {where} in c10.toml") from exc
    if not data.strip():
        raise CalibrationCacheError(f"{spec.calibration_path}: the INT8 calibration cache of "
                                    f"model {spec.model!r} is empty; regenerate it or fix {where}")
    return data


def check_calibration_for(spec: EngineSpec, data: bytes, tensor_names: list[str]) -> None:
    """A TensorRT calibration cache names the tensors it calibrated: none of ours -> another
    model."""
    lines = data.decode("latin-1").splitlines()
    cached = {line.split(":", 1)[0].strip() for line in lines[1:] if ":" in line}
    if not cached & set(tensor_names):
        raise CalibrationCacheError(
            f"{spec.calibration_path}: this INT8 calibration cache "
            f"({lines[0][:60] if lines else ''}) "
            f"names none of the tensors of {spec.onnx_path.name} (inputs "
            f"{tensor_names[:3]}); it is for another model: regenerate it or fix "
            f"models.{spec.model}.calibration")
