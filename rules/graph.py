"""Everything decided when the graph loads: config, tile scan, blocks, engine keys, declared files."""
from __future__ import annotations

import gc
import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from c10.config import Config, Model, load_config
from c10.errors import C10Error
from c10.paths import ENGINES_DIR, index_relpaths, shard_relpath
from c10.tiles import Scope, Tile, group_blocks, read_memo, scan_tiles, write_memo

SHARD_ROLES = ("global", "local")  # a matcher has no per-tile output


@dataclass
class ModelPlan:
    """One model's engine and, for embedding roles, its shards and index."""

    model: Model
    backend: object
    spec: object
    engine_key: str
    engine_rel: str
    sidecar_rel: str
    shards: dict[str, list[Tile]] = field(default_factory=dict)  # shard relpath -> its tiles

    @property
    def index_rels(self) -> tuple[str, ...]:
        """The FAISS index and its id map; none for local features (they are read per tile)."""
        return index_relpaths(self.model.name) if self.model.role == "global" else ()

    @cached_property
    def ident(self) -> str:
        """Embedding identity: engine key + preprocessing; a change re-embeds every shard of the model."""
        data = {"engine": self.engine_key, "prep": self.model.preprocessing()}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


@dataclass
class Graph:
    root: Path
    config: Config
    tiles: list[Tile]          # in scope, canonical order
    out_of_scope: list[Tile]
    strays: list[str]
    plans: dict[str, ModelPlan]

    def embedding_plans(self) -> list[ModelPlan]:
        return [p for p in self.plans.values() if p.model.role == "global"]

    def shard_plans(self) -> list[ModelPlan]:
        """Models with per-block shards: global descriptors and local features."""
        return [p for p in self.plans.values() if p.model.role in SHARD_ROLES]

    def declared(self, tiles: bool = True) -> set[str]:
        """Every non-control file the graph reads or writes outside shards/ and index/ (content-named,
        see c10.refs), relative to the root (tiles=False: all but the tiles, for the coverage gate,
        which has the load-time scan of tiles/)."""
        files = {t.path for t in self.tiles} if tiles else set()
        for plan in self.plans.values():
            files |= {plan.engine_rel, plan.sidecar_rel}
        return files | set(self.shipped_inputs())

    def owned_logicals(self) -> list[str]:
        """Logical paths of every shard and index file (each a ref in .c10/refs/)."""
        out = []
        for plan in self.plans.values():
            out += [*plan.shards, *(plan.index_rels if plan.shards else ())]
        return out

    def shipped_inputs(self) -> list[str]:
        """Model files that live inside the cache (they ship with it)."""
        return sorted({rel for p in self.plans.values() for rel in (self.inside(p.model.path),) if rel})

    def inside(self, path: Path) -> str | None:
        """`path` relative to the root if it lies inside the cache, else None."""
        try:
            return Path(path).resolve().relative_to(self.root).as_posix()
        except ValueError:
            return None


_CACHE: dict[Path, Graph | C10Error] = {}
# Column dirs of tiles/ unchanged since the last load are not listed again (c10.tiles.scan_tiles).
SCAN_MEMO = ".c10/tiles-scan.marshal"
_MEMOS: dict[Path, tuple] = {}


def save_scan_memo(root: Path) -> None:
    """Write this load's tile-scan memo if it changed: by the coverage gate, under the build lock
    (loading writes nothing: `doit list`, `c10 query` and `c10 status` work on a read-only cache)."""
    pending = _MEMOS.pop(root, None)
    if pending is not None:
        write_memo(root / SCAN_MEMO, *pending)


def load_graph(root: Path | None = None) -> Graph:
    """The graph of the cache at `root` (default: cwd, where doit runs dodo.py); memoized per process."""
    root = cwd_root() if root is None else Path(root).resolve()
    if root not in _CACHE:
        # 100k tiles, then doit's tasks and dep states: the collector would dominate a no-op. It
        # stays off until the first action runs (collector_back_on) or reset(); the graph lives as
        # long as the process, so it is frozen out of every later collection.
        gc.disable()
        try:
            _CACHE[root] = _load(root)
        except C10Error as exc:
            _CACHE[root] = exc
        gc.freeze()
    graph = _CACHE[root]
    if isinstance(graph, C10Error):
        raise graph
    return graph


def reset(save: bool = True) -> None:
    """Forget loaded graphs and hash caches (the in-process API builds several times in one process).

    save=False drops newly computed hashes unsaved (`c10 status` writes nothing)."""
    for hashes in _HASHES.values() if save else ():
        hashes.save()
    _CACHE.clear()
    _HASHES.clear()
    _MEMOS.clear()
    gc.unfreeze()
    gc.enable()


def collector_back_on() -> None:
    """Actions allocate freely (decoders, engines): give them the garbage collector back."""
    gc.enable()


def _load(root: Path) -> Graph:
    from c10 import engines

    config = load_config(root)
    scope = Scope(config.area.bbox, config.area.zooms)
    memo = read_memo(root / SCAN_MEMO)
    scan = scan_tiles(root, memo)
    _MEMOS[root] = (scan, memo)
    tiles, out = scope.split(scan.tiles)
    plans = {name: _plan(root, config, model, engines) for name, model in config.models.items()}
    for plan in plans.values():
        if plan.model.role in SHARD_ROLES:
            plan.shards = {shard_relpath(plan.model.name, b): ts
                           for b, ts in group_blocks(tiles, config.shards.block).items()}
    return Graph(root, config, tiles, out, scan.strays, plans)


def _plan(root: Path, config: Config, model: Model, engines) -> ModelPlan:
    from c10.errors import ModelError

    backend = engines.get_backend(config.engines.backend)
    if not model.path.is_file():
        raise ModelError(f"{model.path}: ONNX file of model `{model.name}` not found "
                         f"(c10.toml `models.{model.name}.path`); put the file there or fix the path")
    hashes = _hash_cache(root)
    spec = engines.EngineSpec(
        model=model.name, onnx_path=model.path, onnx_hash=_hash_abs(hashes, model.path),
        input_shape=(3, *model.input_size) if model.input_size and model.role != "matcher" else None,
        precision=model.precision, workspace_mb=config.engines.workspace_mb,
        # only the global model embeds batches; local and matcher run one image or pair at a time
        batch=(1, model.batch_size, max(model.batch_size, 64)) if model.role == "global" else (1, 1, 1),
        calibration_path=model.calibration,
        calibration_hash=_hash_abs(hashes, model.calibration) if model.calibration and model.calibration.is_file() else None,
    )
    engine = engines.engine_path(root / ENGINES_DIR, spec, backend)
    return ModelPlan(model, backend, spec, engines.engine_key(spec, backend),
                     engine.relative_to(root).as_posix(),
                     engines.sidecar_path(engine).relative_to(root).as_posix())


_HASHES: dict[Path, object] = {}


def _hash_cache(root: Path):
    """The process's shared hash cache of `root` (the doit checker and the Manifest use the same one)."""
    from c10.hashcache import HashCache

    if root not in _HASHES:
        _HASHES[root] = HashCache(root)
    return _HASHES[root]


def hash_cache(root: Path | None = None):
    return _hash_cache(cwd_root() if root is None else Path(root).resolve())


_ROOTS: dict[str, Path] = {}


def cwd_root() -> Path:
    """The resolved cwd, resolved once per distinct cwd: the checker asks for the hash cache per file."""
    cwd = os.getcwd()
    root = _ROOTS.get(cwd)
    if root is None:
        root = _ROOTS[cwd] = Path(cwd).resolve()
    return root


def _hash_abs(hashes, path: Path) -> str:
    """blake3 of a file anywhere (models may live outside the cache): cached by its absolute path."""
    return hashes.hash(str(Path(path).resolve()))[0]
