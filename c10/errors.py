"""The one exception tree of c10: every message says what, where, and the next step.

Every hard error of a build is an instance of one of the seed contract's six classes
(BuildLockHeldError, ManifestCoverageError, EngineBuildError, CalibrationCacheError,
DescriptorBatchError, ManifestWriteError), most through a subclass that says more; the table in
README.md ("Errors a build raises") says when each is raised and what the caller does. Outside
the six: a bad request (ConfigError, CacheRootMissingError: nothing was built), missing tiles
(MissingTilesError: the API's soft FAILURE), and the errors of tools that are not a build
(TileError of `c10 import`, TrustedKeyError and VerifyError of `c10 verify`).
"""
from __future__ import annotations

RERUN = "run `doit build_cache` again"
BUILD_FIRST = "run `doit build_cache` in the cache first"


class C10Error(Exception):
    """Base of every error c10 raises on purpose; the CLI prints it as one line.

    The message is built from the fields: `problem; fix, then <then>`. `then` is the class's usual
    last step (for errors of a build: run `doit build_cache` again), so no raise spells it out."""

    exit_code = 1
    then = ""

    def __init__(self, problem: str, fix: str = "", *, then: str | None = None):
        self.problem, self.fix = problem, fix
        if then is not None:
            self.then = then
        super().__init__(self.message())

    def message(self) -> str:
        steps = [step for step in (self.fix, self.then) if step]
        if len(steps) == 2:
            return f"{self.problem}; {steps[0]}, then {steps[1]}"
        return f"{self.problem}; {steps[0]}" if steps else self.problem

    def __reduce__(self):
        # As raised, fields and text: a Dask worker's error reaches the driver unchanged.
        return _restore, (type(self), dict(self.__dict__), str(self))


def _restore(cls: type, fields: dict, text: str) -> C10Error:
    err = cls.__new__(cls)
    Exception.__init__(err, text)
    err.__dict__.update(fields)
    return err


class BuildStepError(C10Error):
    """An error of a build step: after the fix, the next build redoes only what failed."""

    then = RERUN


class ConfigError(C10Error):
    """c10.toml is missing, unparsable, or holds an unknown or invalid key."""

    exit_code = 2


class CacheRootMissingError(ConfigError):
    """The cache directory does not exist (seed CP-INV-5: never created by accident).

    A bad request like any ConfigError (same exit code): nothing was built or written."""


class TileError(C10Error):
    """A file under tiles/ or an import source is not a valid z/x/y tile."""


class EngineBuildError(BuildStepError):
    """An engine could not be compiled or loaded (seed: propagated from the engine compiler):
    the backend failed, is missing, or refuses the precision; subclasses: a bad model, an engine
    of another host."""


class ModelError(EngineBuildError):
    """An ONNX model is missing, does not parse, or disagrees with c10.toml (its engine cannot be
    built: an EngineBuildError, as the seed files it)."""


class EngineMismatchError(EngineBuildError):
    """An engine was loaded on a host whose fingerprint differs from the one it was built for
    (seed D-C10-6, the engine compiler's); its messages name their own next step."""

    then = ""


class CalibrationCacheError(BuildStepError):
    """An INT8 calibration cache is missing, unreadable, empty, or for another model."""


class DescriptorBatchError(BuildStepError):
    """A tile could not be decoded, or the engine failed on a batch of tiles (seed: propagated
    from the batcher: an out-of-memory or any other inference error of the engine's runtime)."""


class IndexBuildError(DescriptorBatchError):
    """FAISS could not build or write the index over the descriptors (the descriptor stage's last
    step, so a DescriptorBatchError to a caller of the seed's API)."""


class ManifestWriteError(BuildStepError):
    """The Manifest could not be signed or written (key not allowed, key load, disk)."""


class SigningKeyError(ManifestWriteError):
    """The operator key is missing, unreadable, unsafe, or its passphrase is wrong (seed: a key
    load failure is a ManifestWriteError); its messages name their own next step."""

    then = ""


class TrustedKeyError(C10Error):
    """A trusted public key (--trusted-keys, the trust store) cannot be read or is not Ed25519:
    the verifier's input, never a build's."""


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


class MissingTilesError(BuildStepError):
    """Tiles of the requested area are missing (none at all, or some with area.require_complete).

    A soft failure: the Python API returns outcome FAILURE with this message instead of raising.
    """


class StorageError(ManifestWriteError, OSError):
    """A file could not be written durably (disk full, I/O error, read-only); never retried.

    Every file a build writes is written for the Manifest's commit, and the seed files an
    atomic-write failure under ManifestWriteError ("operator inspects key / disk"). Also an
    OSError, so code that handles a failed write keeps handling this one.
    """
