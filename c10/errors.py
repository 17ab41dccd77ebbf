"""The one exception tree of c10: every message says what, where, and the next command."""
from __future__ import annotations


class C10Error(Exception):
    """Base of every error c10 raises on purpose; the CLI prints it as one line."""

    exit_code = 1


class ConfigError(C10Error):
    """c10.toml is missing, unparsable, or holds an unknown or invalid key."""

    exit_code = 2


class CacheRootMissingError(C10Error):
    """The cache directory does not exist (seed CP-INV-5: never created by accident)."""

    exit_code = 2


class TileError(C10Error):
    """A file under tiles/ is not a valid z/x/y tile."""


class ModelError(C10Error):
    """An ONNX model is missing, does not parse, or disagrees with c10.toml."""


class EngineBuildError(C10Error):
    """A backend failed to compile an engine (seed: propagated from the engine compiler)."""


class CalibrationCacheError(C10Error):
    """An INT8 calibration cache is missing, unreadable, or for another model."""


class EngineMismatchError(C10Error):
    """An engine was loaded on a host whose fingerprint differs from the one it was built for."""


class DescriptorBatchError(C10Error):
    """A tile could not be decoded or embedded (seed: propagated from the batcher)."""


class IndexBuildError(C10Error):
    """FAISS could not build or write the index."""


class SigningKeyError(C10Error):
    """The operator key is missing, unreadable, unsafe, or its passphrase is wrong."""


class ManifestWriteError(C10Error):
    """The Manifest could not be signed or written (key not allowed, key load, disk)."""


class ManifestCoverageError(C10Error):
    """A file under the cache is declared by no task (seed D-C10-3: no smuggled files)."""


class BuildLockHeldError(C10Error):
    """Another build holds the cache's .c10.lock (seed CP-INV-4)."""

    exit_code = 3


class VerifyError(C10Error):
    """`c10 verify` rejected the cache; `reason` is a stable failure class name."""

    def __init__(self, reason: str, message: str, path: str | None = None):
        super().__init__(message)
        self.reason = reason
        self.path = path


class MissingTilesError(C10Error):
    """Tiles of the requested area are missing (none at all, or some with area.require_complete).

    A soft failure: the Python API returns outcome FAILURE with this message instead of raising.
    """


class StorageError(C10Error, OSError):
    """A file could not be written durably (disk full, I/O error, read-only); never retried.

    Also an OSError, so code that handles a failed write keeps handling this one.
    """
