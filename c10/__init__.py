"""c10: builds the signed offline takeoff cache of a GPS-denied UAV."""

__version__ = "0.2.0"

# The seed's Python API, imported on first use: `import c10` stays light while the doit graph loads.
_API = frozenset({
    "CacheProvisioner", "DoitCacheProvisioner", "BuildRequest", "BuildReport", "BuildOutcome",
    "SectorClassification", "Bbox", "EngineCompileRequest", "EngineCacheEntry",
    "BuildLockHeldError", "ManifestCoverageError", "EngineBuildError", "CalibrationCacheError",
    "DescriptorBatchError", "ManifestWriteError", "MissingTilesError"})


def __getattr__(name: str):
    if name in _API:
        from c10 import api

        return getattr(api, name)
    if name == "FlightCache":  # the aircraft's side: no doit, no build code
        from c10.query.flight import FlightCache

        return FlightCache
    raise AttributeError(f"module 'c10' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _API | {"FlightCache"})
