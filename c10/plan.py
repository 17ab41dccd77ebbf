"""What the graph decides when it loads: config, tile scan, blocks, engine keys, declared files."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

from c10.canonical import digest
from c10.config import Config, Model, load_config
from c10.errors import CalibrationCacheError, EngineBuildError, ModelError
from c10.features import engines
from c10.features.window_grid import WindowBlock, window_blocks
from c10.store.blockstate import BlockState, full_stat
from c10.store.hashcache import HashCache
from c10.store.host import cache_secret
from c10.store.layout import (
    ENGINES_DIR,
    SCAN_MEMO,
    index_relpaths,
    shard_relpath,
    trained_relpaths,
    window_relpath,
)
from c10.store.tiles import Scan, Scope, Tile, read_memo, scan_tiles, split_blocks

SHARD_ROLES = ("global", "local")  # a matcher has no per-tile output
INT8_ROLES = SHARD_ROLES  # what ONNX Runtime and OpenVINO quantize themselves, each gated
# Bump when what goes into an embedding identity changes: every shard is re-embedded once.
IDENT_SCHEMA = 2


@dataclass
class ModelPlan:
    """One model's engine and, for embedding roles, its shards and index."""

    model: Model
    backend: engines.Backend
    spec: engines.EngineSpec
    engine_key: str
    engine_rel: str
    sidecar_rel: str
    shards: dict[str, list[Tile]] = field(default_factory=dict)  # shard relpath -> its tiles
    blocks: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # shard relpath -> block
    # global models with shards.stride < 1: window shard relpath -> the tiles its windows cover
    windows: dict[str, WindowBlock] = field(default_factory=dict)
    # an IVF index's trained quantizer and its meta (c10.features.ivf), shipped as index files
    trained: tuple[str, ...] = ()

    @property
    def index_rels(self) -> tuple[str, ...]:
        """The FAISS index and its id map; none for local features (they are read per tile)."""
        if self.model.role != "global" or not self.shards:
            return ()
        return index_relpaths(self.model.name)

    @cached_property
    def ident(self) -> str:
        """Embedding identity: engine key + preprocessing; a change re-embeds every shard of the
        model."""
        return digest({"schema": IDENT_SCHEMA, "engine": self.engine_key,
                       "prep": self.model.preprocessing()})


@dataclass(frozen=True)
class TileCounts:
    """Tiles of the request: expected in area.bbox/zooms, present on disk, missing; and the tiles
    on disk outside it."""

    expected: int
    present: int
    out_of_scope: int = 0

    @property
    def missing(self) -> int:
        return self.expected - self.present


@dataclass
class Plan:
    root: Path
    config: Config
    tiles: list[Tile]          # in scope, canonical order
    # tiles outside area.bbox/zooms: inputs the graph holds and never reads (not orphans: kept
    # for a wider or other request), never indexed nor listed in the Manifest (CP-TC-3)
    out_of_scope: list[Tile]
    strays: list[str]
    plans: dict[str, ModelPlan]
    scan: Scan | None = None   # this load's tile scan (its memo is saved by the coverage gate)
    state: BlockState | None = None  # each block's content key, from the scan

    def block_key(self, block: tuple[int, int, int], reach: int = 0) -> str:
        """Content key of a block's tiles in scope (reach 1: and of the next column and row, which
        its windows cover): what decides whether its shard is stale (c10.store.blockstate)."""
        z, bx, by = block
        size = self.config.shards.block
        x0, x1, y0, y1 = self._ranges[z]
        return self.state.rect_key(z, max(bx * size, x0), min(bx * size + size - 1 + reach, x1),
                                   max(by * size, y0), min(by * size + size - 1 + reach, y1))

    @cached_property
    def _ranges(self) -> dict[int, tuple[int, int, int, int]]:
        return Scope(self.config.area.bbox, self.config.area.zooms).ranges

    def embedding_plans(self) -> list[ModelPlan]:
        return [p for p in self.plans.values() if p.model.role == "global"]

    def shard_plans(self) -> list[ModelPlan]:
        """Models with per-block shards: global descriptors and local features."""
        return [p for p in self.plans.values() if p.model.role in SHARD_ROLES]

    def tile_counts(self) -> TileCounts:
        area = self.config.area
        return TileCounts(Scope(area.bbox, area.zooms).expected_count(), len(self.tiles),
                          len(self.out_of_scope))

    def declared(self, tiles: bool = True) -> set[str]:
        """Every non-control file the graph reads or writes outside shards/ and index/
        (content-named, see c10.store.refs), relative to the root (tiles=False: all but the tiles,
        for the coverage gate, which has the load-time scan of tiles/)."""
        files = {t.path for t in self.tiles} if tiles else set()
        for plan in self.plans.values():
            files |= {plan.engine_rel, plan.sidecar_rel}
        return files | set(self.shipped_inputs())

    def owned_logicals(self) -> list[str]:
        """Logical paths of every shard and index file (each a ref in .c10/refs/)."""
        out = []
        for plan in self.plans.values():
            out += [*plan.shards, *plan.windows, *plan.index_rels, *plan.trained]
        return out

    def shipped_inputs(self) -> list[str]:
        """Model files that live inside the cache (they ship with it)."""
        return sorted({rel for p in self.plans.values() if (rel := self.inside(p.model.path))})

    def inside(self, path: Path) -> str | None:
        """`path` relative to the root if it lies inside the cache, else None."""
        try:
            return Path(path).resolve().relative_to(self.root).as_posix()
        except ValueError:
            return None


def load_plan(root: Path, hashes: HashCache, memo: bool = True, full: bool | None = None) -> Plan:
    """The plan of the cache at `root`; C10Error (ConfigError, ModelError...) for a bad request.

    memo: list only the tile columns whose directory changed since the last saved scan. full
    (default: C10_FULL_STAT): list every column and check every tile's stat and content."""
    root = Path(root).resolve()
    config = load_config(root)
    scope = Scope(config.area.bbox, config.area.zooms)
    full = full_stat() if full is None else full
    known = {} if full else read_memo(root / SCAN_MEMO, cache_secret(root))
    scan = scan_tiles(root, known if memo else None)
    tiles, out, blocks = split_blocks(scan.columns, scope, config.shards.block)
    plans = {name: _model_plan(root, config, model, hashes, tiles)
             for name, model in config.models.items()}
    windows = window_blocks(tiles, config.shards.block, config.shards.div)
    for plan in plans.values():
        if plan.model.role in SHARD_ROLES:
            plan.shards = {shard_relpath(plan.model.name, b): ts for b, ts in blocks.items()}
            plan.blocks = {shard_relpath(plan.model.name, b): b for b in blocks}
        if plan.model.role == "global":
            plan.windows = {window_relpath(plan.model.name, b): ws for b, ws in windows.items()}
            if config.index.grows and plan.shards:
                plan.trained = trained_relpaths(plan.model.name)
    return Plan(root, config, tiles, out, scan.strays, plans, scan,
                BlockState(scan, hashes, config.shards.block, full))


def _model_plan(root: Path, config: Config, model: Model, hashes: HashCache,
                tiles: list[Tile] | None = None) -> ModelPlan:
    backend = engines.get_backend(config.engines.backend)
    if not model.path.is_file():
        raise ModelError(f"{model.path}: ONNX file of model `{model.name}` not found (c10.toml "
                         f"`models.{model.name}.path`)", fix="put the file there or fix the path")
    calibration = check_calibration(model, backend)
    spec = engines.EngineSpec(
        model=model.name, onnx_path=model.path, onnx_hash=hashes.hash_abs(model.path),
        input_shape=(3, *model.input_size) if model.input_size and model.role != "matcher"
        else None,
        precision=model.precision, workspace_mb=config.engines.workspace_mb,
        # only the global model embeds batches; local and matcher run one image or pair at a time
        batch=((1, model.batch_size, max(model.batch_size, 64)) if model.role == "global"
               else (1, 1, 1)),
        calibration_path=calibration,
        calibration_hash=hashes.hash_abs(calibration) if calibration else None,
        role=model.role,
    )
    if model.precision == "int8" and backend.quantizer() is not None:  # calibrated on tiles
        from c10.features.int8 import plan_sample

        spec = replace(spec, **plan_sample(root, model, tiles or [], spec.calibration_hash,
                                           lambda rel: hashes.hash(rel)[0]))
        if model.role == "local":  # gated by the matches the sector's matcher keeps
            matcher = next((m for m in config.models.values() if m.role == "matcher"), None)
            spec = replace(spec, gate_matcher=str(matcher.path) if matcher else None,
                           int8_min_match_retention=model.int8_min_match_retention)
    engine = engines.engine_path(root / ENGINES_DIR, spec, backend)
    return ModelPlan(model, backend, spec, engines.engine_key(spec, backend),
                     engine.relative_to(root).as_posix(),
                     engines.sidecar_path(engine).relative_to(root).as_posix())


def check_calibration(model: Model, backend: engines.Backend) -> Path | None:
    """`models.NAME.calibration`, checked whenever it is given (a regular, readable, non-empty
    file) and required by an INT8 model on TensorRT (its calibration cache); ONNX Runtime
    and OpenVINO calibrate a global or local model on the cache's own tiles, or on that file
    as an .npy of preprocessed tensors. Checked when the graph loads, before any engine is
    compiled."""
    name, path = model.name, model.calibration
    key = f"models.{name}.calibration"
    own = backend.quantizer() is not None  # it quantizes itself (ONNX Runtime, OpenVINO)
    if model.precision == "int8":
        if "int8" not in backend.precisions:
            raise EngineBuildError(
                f"model {name!r} has precision int8, but only the TensorRT and ONNX Runtime "
                f"backends build INT8 engines and engines.backend is {backend.name!r} on this "
                "host", f"set models.{name}.precision to one of {', '.join(backend.precisions)}, "
                "or set engines.backend = \"onnxruntime\"")
        if own and model.role not in INT8_ROLES:
            raise EngineBuildError(
                f"model {name!r} has precision int8, but {backend.name} builds INT8 engines "
                f"only for global and local models (its accuracy gates are on descriptors and "
                f"on matches; {name!r} is {model.role!r})",
                f"set models.{name}.precision = \"fp32\"")
        if path is None and not own:
            raise CalibrationCacheError(
                f"model {name!r} has precision int8 but no calibration cache",
                f"set {key} in c10.toml (or the request's calibration_path) to its TensorRT "
                "calibration cache")
    if path is None:
        return None
    try:
        if not path.is_file():
            raise CalibrationCacheError(
                f"{path}: the calibration cache of model {name!r} ({key}) "
                + ("is not a regular file" if path.exists() else "does not exist"),
                f"fix {key} in c10.toml")
        data = path.read_bytes()
    except OSError as exc:
        raise CalibrationCacheError(
            f"{path}: cannot read the calibration cache of model {name!r} ({key}): "
            f"{exc.strerror or exc}", f"fix its permissions or {key} in c10.toml") from None
    if not data.strip():
        raise CalibrationCacheError(f"{path}: the calibration cache of model {name!r} ({key}) is "
                                    "empty", f"regenerate it or fix {key} in c10.toml")
    if own and model.precision == "int8":
        from c10.features.int8 import check_npy

        check_npy(path, name)
    return path
