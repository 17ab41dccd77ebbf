"""The Manifest's signed runtime spec: all the aircraft needs to use a cache, checked on parse."""
from __future__ import annotations

from dataclasses import dataclass

from c10.errors import VerifyError
from c10.store.layout import MANIFEST_NAME

ROLES = ("global", "local", "matcher")
PREP_KEYS = ("input_size", "mean", "std", "channel_order", "resize", "code")
MAX_DIV = 4  # c10.config.MAX_DIV: the finest stride a build makes


@dataclass(frozen=True)
class IndexSpec:
    index: str            # listed path of the FAISS index
    ids: str              # listed path of its row -> tile id array
    factory: str
    metric: str
    ef_search: int
    # ids count in 1/div tile (shards.stride = 1/div): a row's footprint is the one-tile square
    # whose top-left corner is (x/div, y/div); 1: tile ids (and a Manifest that does not say)
    div: int = 1


@dataclass(frozen=True)
class ModelSpec:
    name: str
    role: str
    engine: str           # listed path
    sidecar: str          # listed path
    backend: str
    key: str              # engine identity key (sha256 of the sidecar's key material)
    precision: str
    batch_size: int
    preprocessing: dict   # c10.config.Model.preprocessing(): input_size, mean, std, ...
    index: IndexSpec | None = None
    shards: dict | None = None  # local features: logical shard path -> listed path


@dataclass(frozen=True)
class Area:
    name: str | None
    bbox: tuple[float, float, float, float]
    zooms: tuple[int, ...]
    sector_class: str


@dataclass(frozen=True)
class RuntimeSpec:
    area: Area
    block: int
    models: dict[str, ModelSpec]

    def role(self, role: str) -> list[ModelSpec]:
        return [m for m in self.models.values() if m.role == role]


def parse_runtime(manifest: dict, listed: set[str]) -> RuntimeSpec:
    """The runtime spec of a parsed Manifest, every path it names listed in its files, every
    value of the type the aircraft uses; VerifyError(bad-manifest) otherwise."""
    spec = manifest.get("runtime")
    if not isinstance(spec, dict):
        raise _bad("it has no runtime spec (built by c10 0.1: rebuild it with this c10)")
    try:
        area = _area(spec["area"])
        block = _int(spec["tiles"]["block"], "runtime.tiles.block")
        models = {name: _model(name, value, listed)
                  for name, value in _dict(spec["models"]).items()}
    except (KeyError, TypeError) as exc:
        raise _bad(f"its runtime spec lacks or mistypes {exc}") from None
    return RuntimeSpec(area, block, models)


def _area(value) -> Area:
    value = _dict(value)
    name = value.get("name")
    if name is not None and not isinstance(name, str):
        raise TypeError("runtime.area.name")
    bbox = tuple(float(_num(v, "runtime.area.bbox")) for v in value["bbox"])
    zooms = tuple(_int(z, "runtime.area.zooms") for z in value["zooms"])
    if len(bbox) != 4 or not zooms:
        raise TypeError("runtime.area.bbox/zooms")
    return Area(name, bbox, zooms, _str(value["sector_class"], "runtime.area.sector_class"))


def _model(name: str, value, listed: set[str]) -> ModelSpec:
    value = _dict(value)
    role = _str(value["role"], f"runtime.models.{name}.role")
    if role not in ROLES:
        raise TypeError(f"runtime.models.{name}.role")
    prep = _dict(value["preprocessing"])
    # "decode" only when not "full" (c10.config.Model.preprocessing): checked by the query side
    if set(prep) - {"decode"} != set(PREP_KEYS) or not isinstance(prep.get("decode", ""), str):
        raise TypeError(f"runtime.models.{name}.preprocessing")
    index = _index(name, value["index"], listed) if role == "global" else None
    shards = None
    if role == "local":
        shards = {_str(k, "shards"): _listed(v, listed, f"runtime.models.{name}.shards")
                  for k, v in _dict(value["shards"]).items()}
    return ModelSpec(name, role, _listed(value["engine"], listed, f"runtime.models.{name}.engine"),
                     _listed(value["sidecar"], listed, f"runtime.models.{name}.sidecar"),
                     _str(value["backend"], f"runtime.models.{name}.backend"),
                     _str(value["key"], f"runtime.models.{name}.key"),
                     _str(value["precision"], f"runtime.models.{name}.precision"),
                     _int(value["batch_size"], f"runtime.models.{name}.batch_size"), prep, index,
                     shards)


def _index(name: str, value, listed: set[str]) -> IndexSpec:
    value = _dict(value)
    where = f"runtime.models.{name}.index"
    div = _int(value.get("div", 1), f"{where}.div")  # (c10 before windows: tile ids)
    if not 1 <= div <= MAX_DIV:
        raise TypeError(f"{where}.div")
    return IndexSpec(_listed(value["index"], listed, where), _listed(value["ids"], listed, where),
                     _str(value["factory"], where), _str(value["metric"], where),
                     _int(value["ef_search"], where), div)


def _listed(value, listed: set[str], where: str) -> str:
    if not isinstance(value, str) or value not in listed:
        raise _bad(f"its runtime spec names {value!r} ({where}), a file it does not list")
    return value


def _dict(value) -> dict:
    if not isinstance(value, dict):
        raise TypeError("a table")
    return value


def _str(value, where: str) -> str:
    if not isinstance(value, str):
        raise TypeError(where)
    return value


def _int(value, where: str) -> int:
    if type(value) is not int:
        raise TypeError(where)
    return value


def _num(value, where: str):
    if type(value) not in (int, float):
        raise TypeError(where)
    return value


def _bad(what: str) -> VerifyError:
    return VerifyError("bad-manifest", f"Manifest.json is not one this c10 can fly: {what}",
                       MANIFEST_NAME)
