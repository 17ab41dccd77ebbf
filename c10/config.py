"""The build request: c10.toml parsed into frozen dataclasses, every bad key named."""
from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from c10.errors import ConfigError
from c10.store.layout import CONFIG_NAME

SECTOR_CLASSES = ("active_conflict", "stable_rear")
# What area.sector_class means: the defaults of the keys it governs, for a c10.toml that does not
# set them (the effective values are resolved here, so the build, its keys and the Manifest all
# see them). An active-conflict sector's imagery goes stale in days: its Manifest expires sooner.
# Missing tiles fail the build in every sector unless area.require_complete = false.
SECTOR_DEFAULTS = {
    "stable_rear": {"validity_days": 30, "require_complete": True},
    "active_conflict": {"validity_days": 7, "require_complete": True},
}
ROLES = ("global", "local", "matcher")
BACKENDS = ("auto", "tensorrt", "openvino", "onnxruntime")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
METRICS = ("ip", "l2")
RESIZE_MODES = ("bilinear", "bicubic", "nearest", "area")
DECODE_MODES = ("full", "scaled")  # c10.features.preprocess.decode
EXECUTORS = ("local", "dask")
TILE_TRANSPORTS = ("bytes", "shared")
MAX_ZOOM = 24
# Model settings only precision = "int8" reads: left out of the request of any other model
INT8_KEYS = ("calibration_tiles", "holdout_tiles", "int8_min_cosine", "int8_max_recall_drop")
LOCAL_INT8_KEYS = ("int8_min_match_retention",)  # and only an INT8 local-feature model
MAX_DIV = 4  # shards.stride down to 1/4 tile: 16 rows per tile already
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class Area:
    bbox: tuple[float, float, float, float]  # lat_min, lon_min, lat_max, lon_max (seed Bbox order)
    zooms: tuple[int, ...]
    sector_class: str = "stable_rear"
    require_complete: bool = True   # default per sector: SECTOR_DEFAULTS
    name: str | None = None  # the sector's name, signed: `c10 verify --area NAME` checks it


@dataclass(frozen=True)
class Model:
    name: str
    path: Path
    role: str = "global"
    input_size: tuple[int, int] | None = (224, 224)
    precision: str = "fp32"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    channel_order: str = "rgb"
    resize: str = "bilinear"
    # "scaled": a global model's JPEG tiles (and query frames) of at least twice input_size decode
    # at 1/2, 1/4 or 1/8 in libjpeg-turbo's IDCT before the resize (c10.features.preprocess)
    decode: str = "full"
    batch_size: int = 32
    calibration: Path | None = None
    # INT8 on ONNX Runtime: tiles it calibrates on and tiles its accuracy gate holds out
    # (c10.features.int8), and the gate's thresholds against the fp32 engine.
    calibration_tiles: int = 128
    holdout_tiles: int = 128
    int8_min_cosine: float = 0.99
    int8_max_recall_drop: float = 0.01
    # a local model's gate: the share of its fp32 features' correct matches INT8 keeps
    # (c10.features.int8_local; the default from the real ALIKED's measure, docs/figures.md)
    int8_min_match_retention: float = 0.85

    def preprocessing(self) -> dict[str, Any]:
        """The settings that change a descriptor, and the version of the code that applies them
        (c10.preprocess): part of every shard's key."""
        prep = {"input_size": self.input_size, "mean": self.mean, "std": self.std,
                "channel_order": self.channel_order, "resize": self.resize,
                "code": PREPROCESSING_CODE}
        if self.decode != "full":  # full decode: the identity (and Manifest) of a c10 without it
            prep["decode"] = self.decode
        return prep


# Bump when c10.preprocess computes a tensor differently for the same settings (2: bilinear and
# area resizes as float matmuls instead of Pillow's 8-bit passes), so that existing shards are
# re-embedded once instead of mixing descriptors the query side no longer reproduces.
PREPROCESSING_CODE = 2


@dataclass(frozen=True)
class Engines:
    backend: str = "auto"
    workspace_mb: int = 1024


@dataclass(frozen=True)
class Shards:
    block: int = 16
    # Retrieval windows of the global models, in tiles: 1 (tiles only), 0.5 (windows at half-tile
    # offsets), 1/3, 0.25 (c10.features.windows)
    stride: float = 1.0

    @property
    def div(self) -> int:
        """Window offsets per tile side (1 / stride): index ids count in 1/div tile."""
        return round(1 / self.stride)


@dataclass(frozen=True)
class Index:
    factory: str = "Flat"
    metric: str = "ip"
    ef_construction: int = 40
    ef_search: int = 64
    # IVF factories only (IVF_KEYS; docs/scale.md): lists probed per query (saved in the index),
    # rows the quantizer is trained on, a number to bump to retrain, and the drift (mean coarse
    # error of the indexed rows over the training sample's) past which a build retrains (0: never)
    nprobe: int = 16
    train_sample: int = 65536
    train_generation: int = 1
    retrain_drift: float = 1.25

    @property
    def grows(self) -> bool:
        """An IVF factory: trained once, its lists updated per shard (c10.features.ivf)."""
        return _GROWING.match(self.factory) is not None


IVF_KEYS = ("nprobe", "train_sample", "train_generation", "retrain_drift")
# An IndexIVF itself (no pre-transform, one encoding): its standalone codes add list by list.
_GROWING = re.compile(r"^IVF\d+(?:_[A-Za-z0-9]+)?,[^,]+$")


@dataclass(frozen=True)
class Signing:
    key: Path | None = None
    passphrase_file: Path | None = None
    allowed_keyids: tuple[str, ...] = ()
    validity_days: int = 30         # default per sector: SECTOR_DEFAULTS


@dataclass(frozen=True)
class Executor:
    """Where shards are embedded: this process, or the workers of a Dask scheduler."""

    kind: str = "local"
    scheduler: str = ""       # e.g. "tcp://10.0.0.5:8786" (kind = "dask")
    # "bytes": the driver sends tile bytes; "shared": workers read a shared path
    tiles: str = "bytes"
    # the cache root as the workers see it (tiles = "shared"; default: the same path)
    shared_root: str = ""


@dataclass(frozen=True)
class Config:
    root: Path
    area: Area
    models: dict[str, Model] = field(default_factory=dict)
    engines: Engines = Engines()
    shards: Shards = Shards()
    index: Index = Index()
    signing: Signing = Signing()
    executor: Executor = Executor()

    def request(self) -> dict[str, Any]:
        """The request as plain JSON values (not the executor: where descriptors are computed is
        not what the cache is); the build's own key of what it was asked."""
        request = _plain(dataclasses.asdict(self) | {"root": None, "executor": None})
        if self.shards.stride == 1:  # tiles only: the request (and Manifest) of a c10 without it
            del request["shards"]["stride"]
        if not self.index.grows:  # settings only an IVF index reads: other requests as before
            for key in IVF_KEYS:
                del request["index"][key]
        for model in request["models"].values():  # settings only an INT8 model reads
            if model["precision"] != "int8":
                for key in INT8_KEYS:
                    del model[key]
            if model["precision"] != "int8" or model["role"] != "local":
                for key in LOCAL_INT8_KEYS:
                    del model[key]
            if model["decode"] == "full":  # the request of a c10 without the key
                del model["decode"]
        return request

    def signed_request(self) -> dict[str, Any]:
        """The request as the Manifest records it: no workstation path (a model by its path
        inside the cache, or by name only; the signing key by keyid, added by the writer)."""
        request = self.request()
        for name, model in request.get("models", {}).items():
            for key in ("path", "calibration"):
                if key in model:
                    model[key] = _inside(Path(model[key]), self.root)
        request["signing"] = {k: v for k, v in request.get("signing", {}).items()
                              if k in ("allowed_keyids", "validity_days")}
        return request


def _inside(path: Path, root: Path) -> str | None:
    """`path` relative to the cache root, or None for a file outside it (not shipped)."""
    try:
        return path.resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return None


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def load_config(root: Path) -> Config:
    """Read and validate `root/c10.toml`."""
    path = Path(root) / CONFIG_NAME
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no build request here; run `c10 init {root}` first") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: TOML syntax error: {exc}; fix the file and re-run") from None
    return parse_config(data, Path(root).resolve(), str(path))


def parse_config(data: dict, root: Path, where: str = CONFIG_NAME) -> Config:
    """Validate a parsed c10.toml mapping; `where` names the file in errors."""
    _check_keys(data, {"area", "models", "engines", "shards", "index", "signing", "executor"},
                where, "")
    if "area" not in data:
        raise ConfigError(f"{where}: missing [area] table (bbox and zooms); see `c10 init`")
    models = data.get("models", {})
    if not isinstance(models, dict):
        raise ConfigError(f"{where}: [models] must be tables like [models.global]")
    area = _area(data["area"], where)
    return Config(
        root=root,
        area=area,
        models={name: _model(name, spec, root, where) for name, spec in models.items()},
        engines=_section(Engines, data.get("engines", {}), where, "engines"),
        shards=_shards(data.get("shards", {}), where),
        index=_index(data.get("index", {}), where),
        signing=_signing(data.get("signing", {}), root, where, area.sector_class),
        executor=_executor(data.get("executor", {}), where),
    )


def _check_keys(table: Any, allowed: set[str], where: str, prefix: str) -> None:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: `{prefix.rstrip('.')}` must be a table")
    for key in table:
        if key not in allowed:
            raise ConfigError(
                f"{where}: unknown key `{prefix}{key}`; allowed here: {', '.join(sorted(allowed))}")


def _section(cls: type, table: dict, where: str, name: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _check_keys(table, set(fields), where, f"{name}.")
    values = {k: _typed(v, type(getattr(cls(), k)), where, f"{name}.{k}") for k, v in table.items()}
    obj = cls(**values)
    _validate(obj, where, name)
    return obj


def _typed(value: Any, kind: type, where: str, key: str) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is tuple and isinstance(value, list):
        return tuple(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: `{key}` must be a {kind.__name__}, got {value!r}")
    return value


def _validate(obj: Any, where: str, name: str) -> None:
    rules = {
        ("engines", "backend"): BACKENDS, ("index", "metric"): METRICS,
        ("executor", "kind"): EXECUTORS, ("executor", "tiles"): TILE_TRANSPORTS,
    }
    for (section, key), allowed in rules.items():
        if section == name and getattr(obj, key) not in allowed:
            raise ConfigError(f"{where}: `{name}.{key}` = {getattr(obj, key)!r}; allowed: "
                              f"{', '.join(allowed)}")
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, int) and not isinstance(value, bool) and value <= 0:
            raise ConfigError(f"{where}: `{name}.{f.name}` must be positive, got {value}")


def _index(table: dict, where: str) -> Index:
    index = _section(Index, table, where, "index")
    if not 0 <= index.retrain_drift:
        raise ConfigError(f"{where}: `index.retrain_drift` = {index.retrain_drift!r} must be >= 0 "
                          "(0: retrain only when `index.train_generation` changes)")
    return index


def _shards(table: dict, where: str) -> Shards:
    shards = _section(Shards, table, where, "shards")
    stride, allowed = shards.stride, [1.0 / n for n in range(1, MAX_DIV + 1)]
    if not any(abs(stride - a) < 1e-9 for a in allowed):
        raise ConfigError(f"{where}: `shards.stride` = {stride!r}; allowed: 1 (tiles only), 0.5, "
                          f"1/3 (0.3333333333333333) or 0.25: windows at 1/n-tile offsets")
    return dataclasses.replace(shards, stride=1.0 / shards.div)


def _area(table: dict, where: str) -> Area:
    allowed = {"bbox", "zooms", "sector_class", "require_complete", "name"}
    _check_keys(table, allowed, where, "area.")
    bbox = table.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_num(v) for v in bbox)):
        raise ConfigError(f"{where}: `area.bbox` must be [lat_min, lon_min, lat_max, lon_max] in "
                          "degrees")
    lat_min, lon_min, lat_max, lon_max = (float(v) for v in bbox)
    if not (-85.0511 <= lat_min < lat_max <= 85.0511):
        raise ConfigError(f"{where}: `area.bbox` latitudes {lat_min}..{lat_max} must rise within "
                          "-85.0511..85.0511 (Web Mercator); check the order [lat_min, lon_min, "
                          "lat_max, lon_max]")
    if not (-180.0 <= lon_min < lon_max <= 180.0):
        raise ConfigError(f"{where}: `area.bbox` longitudes {lon_min}..{lon_max} must rise within "
                          "-180..180")
    zooms = table.get("zooms")
    valid = isinstance(zooms, list) and all(_is_int(z) and 0 <= z <= MAX_ZOOM for z in zooms)
    if not (valid and zooms):
        raise ConfigError(f"{where}: `area.zooms` must be a non-empty list of integers "
                          f"0..{MAX_ZOOM}, got {zooms!r}")
    sector = table.get("sector_class", "stable_rear")
    if sector not in SECTOR_CLASSES:
        raise ConfigError(f"{where}: `area.sector_class` = {sector!r}; allowed: "
                          f"{', '.join(SECTOR_CLASSES)}")
    complete = _typed(table.get("require_complete", SECTOR_DEFAULTS[sector]["require_complete"]),
                      bool, where, "area.require_complete")
    name = table.get("name")
    if name is not None and not (isinstance(name, str) and _NAME.fullmatch(name)):
        raise ConfigError(f"{where}: `area.name` = {name!r}; use 1-64 letters, digits, '.', '_' or "
                          "'-' (it names the sector in the signed Manifest)")
    return Area((lat_min, lon_min, lat_max, lon_max), tuple(sorted(set(zooms))), sector, complete,
                name)


def _model(name: str, table: dict, root: Path, where: str) -> Model:
    prefix = f"models.{name}."
    fields = {f.name for f in dataclasses.fields(Model)} - {"name"}
    _check_keys(table, fields, where, prefix)
    if "path" not in table:
        raise ConfigError(f"{where}: `{prefix}path` is required (the ONNX file, relative to the "
                          "cache)")
    values = dict(table)
    values["path"] = _path(values["path"], root, where, prefix + "path")
    if values.get("calibration"):
        values["calibration"] = _path(values["calibration"], root, where, prefix + "calibration")
    else:
        values.pop("calibration", None)
    if "input_size" in values:
        values["input_size"] = _input_size(values["input_size"], where, prefix)
    for key in ("mean", "std"):
        if key in values:
            values[key] = _triple(values[key], where, prefix + key)
    model = Model(name=name, **values)
    _check_choice(model.role, ROLES, where, prefix + "role")
    _check_choice(model.precision, PRECISIONS, where, prefix + "precision")
    _check_choice(model.channel_order, ("rgb", "bgr"), where, prefix + "channel_order")
    _check_choice(model.resize, RESIZE_MODES, where, prefix + "resize")
    _check_choice(model.decode, DECODE_MODES, where, prefix + "decode")
    if model.decode != "full" and model.role != "global":
        raise ConfigError(f"{where}: `{prefix}decode` = {model.decode!r} is for global models "
                          "only (a local model's frames and tiles decode at full size); remove "
                          "the key")
    for key in ("batch_size", "calibration_tiles", "holdout_tiles"):
        if not _is_int(getattr(model, key)) or getattr(model, key) <= 0:
            raise ConfigError(f"{where}: `{prefix}{key}` must be a positive integer")
    for key in ("int8_min_cosine", "int8_max_recall_drop", "int8_min_match_retention"):
        if not _is_num(getattr(model, key)) or not 0 <= getattr(model, key) <= 1:
            raise ConfigError(f"{where}: `{prefix}{key}` must be a number from 0 to 1")
    return model


def _input_size(value: Any, where: str, prefix: str) -> tuple[int, int] | None:
    if value in (None, [], 0):
        return None
    if _is_int(value):
        value = [value, value]
    if not (isinstance(value, list) and len(value) == 2
            and all(_is_int(v) and v > 0 for v in value)):
        raise ConfigError(f"{where}: `{prefix}input_size` must be N or [H, W], got {value!r}")
    return (value[0], value[1])


def _triple(value: Any, where: str, key: str) -> tuple[float, float, float]:
    if not (isinstance(value, list) and len(value) == 3 and all(_is_num(v) for v in value)):
        raise ConfigError(f"{where}: `{key}` must be three numbers (R, G, B)")
    return tuple(float(v) for v in value)


def _signing(table: dict, root: Path, where: str, sector: str = "stable_rear") -> Signing:
    _check_keys(table, {f.name for f in dataclasses.fields(Signing)}, where, "signing.")
    values = dict(table)
    for key in ("key", "passphrase_file"):
        if values.get(key):
            values[key] = _path(values[key], root, where, f"signing.{key}")
        else:
            values.pop(key, None)
    if "allowed_keyids" in values:
        values["allowed_keyids"] = tuple(_typed(v, str, where, "signing.allowed_keyids")
                                         for v in values["allowed_keyids"])
    days = values.setdefault("validity_days", SECTOR_DEFAULTS[sector]["validity_days"])
    if not (_is_int(days) and days > 0):
        raise ConfigError(f"{where}: `signing.validity_days` must be a positive integer")
    return Signing(**values)


def _executor(table: dict, where: str) -> Executor:
    executor = _section(Executor, table, where, "executor")
    if executor.kind == "dask" and not executor.scheduler:
        raise ConfigError(f"{where}: `executor.scheduler` is required with executor.kind = "
                          "\"dask\" (the address `dask scheduler` prints, e.g. "
                          "\"tcp://10.0.0.5:8786\")")
    if executor.shared_root and not Path(executor.shared_root).is_absolute():
        raise ConfigError(f"{where}: `executor.shared_root` must be an absolute path (the cache "
                          f"root as the workers mount it), got {executor.shared_root!r}")
    return executor


def _path(value: Any, root: Path, where: str, key: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: `{key}` must be a path string")
    path = Path(value).expanduser()
    return path if path.is_absolute() else root / path


def _check_choice(value: Any, allowed: tuple[str, ...], where: str, key: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{where}: `{key}` = {value!r}; allowed: {', '.join(allowed)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
