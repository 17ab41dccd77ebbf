"""The seed's Python API: CacheProvisioner and its DTOs, run through the doit graph in-process."""
from __future__ import annotations

import json
import re
import time
import tomllib
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Protocol, runtime_checkable

from c10.config import Config, load_config, parse_config
from c10.errors import (  # noqa: F401
    BuildLockHeldError,
    C10Error,
    CalibrationCacheError,
    ConfigError,
    DescriptorBatchError,
    EngineBuildError,
    ManifestCoverageError,
    ManifestWriteError,
    MissingTilesError,
)
from c10.report import BuildOutcome, BuildReport
from c10.store import atomic
from c10.store.layout import CONFIG_NAME
from c10.store.lock import require_cache_root

__all__ = ["CacheProvisioner", "DoitCacheProvisioner", "BuildRequest", "BuildReport",
           "BuildOutcome",
           "SectorClassification", "Bbox", "EngineCompileRequest", "EngineCacheEntry",
           "BuildLockHeldError", "ManifestCoverageError", "EngineBuildError",
           "CalibrationCacheError",
           "DescriptorBatchError", "ManifestWriteError", "MissingTilesError"]


class SectorClassification(Enum):
    ACTIVE_CONFLICT = "active_conflict"
    STABLE_REAR = "stable_rear"


@dataclass(frozen=True)
class Bbox:
    lat_min: float
    lon_min: float
    lat_max: float
    lon_max: float

    def as_tuple(self) -> tuple[float, float, float, float]:
        """c10.toml's area.bbox order (the same as the seed's)."""
        return (float(self.lat_min), float(self.lon_min), float(self.lat_max), float(self.lon_max))


@dataclass(frozen=True)
class BuildRequest:
    bbox: Bbox
    zoom_levels: tuple[int, ...]
    sector_class: SectorClassification
    # INT8 calibration cache, or a directory of {model}.cache; int8 models only
    calibration_path: Path
    cache_root: Path
    key_path: Path           # operator signing key per C10-ST-01


@dataclass(frozen=True)
class EngineCompileRequest:
    """Compile the engines of a cache's corpus (c10.toml's models); None/empty means "as c10.toml
    says".

    A value that disagrees with c10.toml is refused: an engine the build graph does not declare
    would only be an orphan at the next build's coverage gate.
    """

    cache_root: Path
    models: tuple[str, ...] = ()
    backend: str | None = None
    precision: str | None = None
    workspace_mb: int | None = None


@dataclass(frozen=True)
class EngineCacheEntry:
    model: str
    backend: str
    key: str          # engine identity key (sha256 of its canonical key material)
    path: Path
    built: bool       # False: an engine for this key was already on disk and is reused (D-C10-6)


@runtime_checkable
class CacheProvisioner(Protocol):
    """Public top-level orchestrator for the C10 cache build (seed contract v1.0.0)."""

    def build_cache_artifacts(self, request: BuildRequest) -> BuildReport: ...

    def compile_engines_for_corpus(
            self, request: EngineCompileRequest) -> tuple[EngineCacheEntry, ...]: ...


class DoitCacheProvisioner:
    """Runs the cache's doit graph in this process, exactly as `doit build_cache` in cache_root
    would."""

    def build_cache_artifacts(self, request: BuildRequest) -> BuildReport:
        """Write the request into c10.toml if it differs, build, and report.

        Hard errors raise the seed's exceptions; missing tiles return outcome FAILURE. A request
        that fails either way leaves c10.toml as it was (CP-INV-2): its previous bytes are put
        back atomically, under the build lock.
        """
        from c10.rules import session
        from c10.rules.driver import run_build

        t0 = time.perf_counter()
        root = require_cache_root(request.cache_root)  # CP-INV-5: never created here
        text, config = request_config(root, request)
        try:
            # another thread's build in this process: refused before any state is touched
            build = session.begin(root)
            # The key is checked before anything is written (CP-TC-7) and opened only here
            # (CP-INV-7).
            build.operator_key(config.signing)
            build.ensure_locked()  # CP-INV-4: c10.toml is part of the build's state
            previous = _current_config(root) if text is not None else None
            if text is not None:
                atomic.write_text(root / CONFIG_NAME, text)
            try:
                code = run_build(root, ["build_cache"])
                result = _result(root, code, build.report, build.error,
                                 time.perf_counter() - t0)
            except BaseException as exc:
                _restore_config(root, previous, exc)
                raise
            if result.outcome is BuildOutcome.FAILURE:
                _restore_config(root, previous)
        finally:
            session.end()
        return result

    def compile_engines_for_corpus(
            self, request: EngineCompileRequest) -> tuple[EngineCacheEntry, ...]:
        """Compile (or reuse) the engines only: no tiles, descriptors, Manifest or build lock."""
        from c10.features import engines
        from c10.plan import load_plan
        from c10.store.hashcache import HashCache
        from c10.store.layout import ENGINES_DIR
        from c10.trust.provenance import Ledger

        root = require_cache_root(request.cache_root)
        hashes, ledger = HashCache(root), Ledger(root)
        plan = load_plan(root, hashes)
        out = []
        for name in _selected_models(plan.config, request):
            model_plan = plan.plans[name]
            _check_engine_request(plan.config, model_plan, request)
            # compiled here: a later build on this host may sign them (ledgered first)
            path, built = engines.build_engine(
                model_plan.spec, model_plan.backend, root / ENGINES_DIR,
                written=lambda files: _ledger(ledger, files))
            out.append(EngineCacheEntry(name, model_plan.backend.name, model_plan.engine_key, path,
                                        built))
        hashes.save()
        ledger.save()
        return tuple(out)


def _current_config(root: Path) -> tuple[bytes, int]:
    """c10.toml's bytes and mode, read under the build lock before the request replaces it."""
    path = root / CONFIG_NAME
    return path.read_bytes(), path.stat().st_mode & 0o777


def _restore_config(root: Path, previous: tuple[bytes, int] | None,
                    failure: BaseException | None = None) -> None:
    """Put back the c10.toml a failed request replaced (atomically: a kill leaves one or the
    other); if that fails too, the build's own error still propagates, with a note."""
    if previous is None:
        return
    data, mode = previous
    try:
        atomic.write_bytes(root / CONFIG_NAME, data, mode=mode)
    except OSError as exc:
        if failure is None:
            raise
        failure.add_note(f"{root / CONFIG_NAME} could not be restored ({exc}): it still holds "
                         "the failed request")


def _ledger(ledger, files: dict[str, str]) -> None:
    from c10.store.layout import ENGINES_DIR

    for name, digest in files.items():
        ledger.record(f"{ENGINES_DIR}/{name}", digest)
    ledger.save()


def _result(root: Path, code: int, report: BuildReport | None, error: C10Error | None,
            elapsed: float) -> BuildReport:
    if code == 0 and report is not None:
        return replace(report, elapsed_s=round(elapsed, 3))
    if isinstance(error, MissingTilesError) and report is not None:
        return replace(report, outcome=BuildOutcome.FAILURE, elapsed_s=round(elapsed, 3))
    if error is not None:
        raise error
    reason = report.failure_reason if report else f"doit exited with {code}"
    raise C10Error(f"{root}: the build failed: {reason}; see the output above, fix it, then re-run")


# --- the request in c10.toml ----------------------------------------------------------------

def request_config(root: Path, request: BuildRequest) -> tuple[str | None, Config]:
    """(new c10.toml text, or None if it already holds the request; the config to build with).

    Nothing is written here: the caller writes the text once the key and the lock are checked.
    """
    config = load_config(root)  # ConfigError naming `c10 init` when there is none
    edits = _edits(config, request)
    if not edits:
        return None, config
    path = root / CONFIG_NAME
    text = path.read_text(encoding="utf-8")
    for table, values in edits.items():
        text = set_table_keys(text, table, values, str(path))
    try:
        new = parse_config(tomllib.loads(text), root, str(path))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: cannot write the request into it ({exc}); put area.bbox, "
                          "area.zooms and signing.key on one line each, then call again") from None
    if _edits(new, request):
        raise ConfigError(f"{path}: the request did not survive writing it into c10.toml "
                          f"({sorted(_edits(new, request))}); edit the file by hand")
    return text, new


def _edits(config: Config, request: BuildRequest) -> dict[str, dict[str, str]]:
    """TOML values to set, per table, for c10.toml to hold the request."""
    edits: dict[str, dict[str, str]] = {}
    area = {}
    if config.area.bbox != request.bbox.as_tuple():
        area["bbox"] = "[" + ", ".join(repr(v) for v in request.bbox.as_tuple()) + "]"
    zooms = _zooms(request)
    if config.area.zooms != zooms:
        area["zooms"] = "[" + ", ".join(str(z) for z in zooms) + "]"
    sector = SectorClassification(request.sector_class).value
    if config.area.sector_class != sector:
        area["sector_class"] = json.dumps(sector)
    if area:
        edits["area"] = area
    key = Path(request.key_path).expanduser().resolve()
    if config.signing.key is None or Path(config.signing.key).resolve() != key:
        edits["signing"] = {"key": json.dumps(str(key))}
    for name, model in config.models.items():
        calib = _calibration(request, name) if model.precision == "int8" else None
        current = model.calibration and Path(model.calibration).resolve()
        if calib is not None and current != calib:
            edits[f"models.{name}"] = {"calibration": json.dumps(str(calib))}
    return edits


def _zooms(request: BuildRequest) -> tuple[int, ...]:
    zooms = tuple(request.zoom_levels)
    if not zooms or not all(isinstance(z, int) and not isinstance(z, bool) for z in zooms):
        raise ConfigError("BuildRequest.zoom_levels must be a non-empty tuple of integers, got "
                          f"{zooms!r}")
    return tuple(sorted(set(zooms)))


def _calibration(request: BuildRequest, model: str) -> Path | None:
    if request.calibration_path is None:
        return None
    path = Path(request.calibration_path).expanduser().resolve()
    return path / f"{model}.cache" if path.is_dir() else path


_HEADER = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(#.*)?$")


def set_table_keys(text: str, table: str, values: dict[str, str], where: str = CONFIG_NAME) -> str:
    """Set one-line `key = value` assignments in `[table]`, keeping every other line and comment."""
    lines = text.splitlines(keepends=True)
    headers = [(i, m.group(1)) for i, ln in enumerate(lines) if (m := _HEADER.match(ln))]
    start = next((i for i, name in headers if name == table), None)
    if start is None:
        if table.startswith("models."):
            raise ConfigError(f"{where}: no [{table}] table to hold the request's calibration path")
        body = "".join(f"{k} = {v}\n" for k, v in values.items())
        return text + ("" if text.endswith("\n") or not text else "\n") + f"\n[{table}]\n{body}"
    end = next((i for i in range(start + 1, len(lines)) if _HEADER.match(lines[i])), len(lines))
    for key, value in values.items():
        pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
        hit = next((i for i in range(start + 1, end) if pattern.match(lines[i])), None)
        if hit is not None:
            lines[hit] = f"{key} = {value}\n"
        else:
            filled = [i for i in range(start, end)
                      if lines[i].strip() and not lines[i].lstrip().startswith("#")]
            last = max(filled, default=start)
            lines.insert(last + 1, f"{key} = {value}\n")
            end += 1
    return "".join(lines)


# --- engines only ---------------------------------------------------------------------------

def _selected_models(config: Config, request: EngineCompileRequest) -> list[str]:
    names = list(request.models) or list(config.models)
    unknown = [n for n in names if n not in config.models]
    if unknown:
        raise ConfigError(f"{config.root / CONFIG_NAME}: no model(s) {unknown} in [models]; "
                          f"known: {', '.join(config.models) or 'none'}")
    return names


def _check_engine_request(config: Config, plan, request: EngineCompileRequest) -> None:
    """Refuse what c10.toml would not build: such an engine would be an undeclared orphan."""
    where = config.root / CONFIG_NAME
    asked = {"engines.backend": (request.backend, plan.backend.name, {"auto", plan.backend.name}),
             f"models.{plan.model.name}.precision": (request.precision, plan.model.precision,
                                                     {plan.model.precision}),
             "engines.workspace_mb": (request.workspace_mb, config.engines.workspace_mb,
                                      {config.engines.workspace_mb})}
    for key, (value, current, ok) in asked.items():
        if value is not None and value not in ok:
            raise ConfigError(f"{where}: the request asks {key} = {value!r} but c10.toml builds "
                              f"{current!r}; set `{key}` in c10.toml first so the build declares "
                              "that engine")
