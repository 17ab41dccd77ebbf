"""Embedding on a Dask cluster: each worker runs its own host's engine; descriptors come back."""
from __future__ import annotations

import dataclasses
import io
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from c10 import __version__
from c10.errors import C10Error, ConfigError, DescriptorBatchError, EngineBuildError
from c10.features.embedding import embed_tiles, progress_bar
from c10.store import atomic

try:
    from distributed import WorkerPlugin
except ImportError:
    # the `cluster` extra is not installed: `connect` says so when a build asks for Dask
    WorkerPlugin = object

# Model batches per Dask task: a worker decodes batch i+1 while its engine runs batch i, and a
# 256-tile block still spreads over several workers. Tasks hold whole model batches, so every
# engine call sees the same batches as in a local build (the same descriptor bytes).
BATCHES_PER_TASK = 4
CONNECT_TIMEOUT_S = 30
TASK_PREFIX = "c10-embed"
WORKER_CACHE_ENV = "C10_WORKER_CACHE"
# finished shards are kept and the previous Manifest stays in force: the next build redoes this one
_KEPT = "finished shards are kept"


# --- what a worker is sent: the engine order, once per worker ----------------------------------

@dataclass(frozen=True)
class EngineOrder:
    """What any worker needs to run a model: the ONNX (to compile for its own host) and the
    driver's engine (valid only on workers whose engine key is the driver's)."""

    backend: str
    spec: object          # c10.engines.EngineSpec of the driver; paths are replaced on the worker
    key: str              # the driver's engine key
    onnx: bytes
    engine: bytes
    sidecar: bytes
    calibration: bytes | None
    version: str = __version__

    @classmethod
    def from_driver(cls, spec, backend_name: str, key: str, engine_path: Path) -> EngineOrder:
        from c10.features.engines import read_calibration, sidecar_path

        return cls(backend_name, spec, key, Path(spec.onnx_path).read_bytes(),
                   Path(engine_path).read_bytes(), sidecar_path(engine_path).read_bytes(),
                   read_calibration(spec))


class EnginePlugin(WorkerPlugin):
    """Registers an EngineOrder on every worker, present and future (the scheduler keeps it);
    compiling waits for the first task, so a slow compile never blocks a worker's event loop."""

    def __init__(self, order: EngineOrder):
        self.order = order
        self.name = plugin_name(order.key)
        self.idempotent = True

    def setup(self, worker=None) -> None:
        with _WORKER_LOCK:
            _WORKER_ORDERS[self.order.key] = self.order


def plugin_name(key: str) -> str:
    return f"c10-engine-{key}"


# --- worker side ---------------------------------------------------------------------------

_WORKER_ORDERS: dict[str, EngineOrder] = {}
_WORKER_RUNNERS: dict[str, tuple[object, str]] = {}
_WORKER_LOCK = threading.Lock()


def worker_cache_dir() -> Path:
    """Where a worker keeps its engines: $C10_WORKER_CACHE, else ~/.cache/c10/worker."""
    if os.environ.get(WORKER_CACHE_ENV):
        return Path(os.environ[WORKER_CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "c10" / "worker"


def prepare_engine(order: EngineOrder, cache: Path) -> tuple[object, str]:
    """(runner, engine key) on this host: the driver's engine if this host's key is the driver's,
    else one compiled here from the ONNX into `cache`; loaded through the host check either way."""
    from filelock import FileLock

    from c10.features import engines

    if order.version != __version__:
        raise EngineBuildError(f"this Dask worker runs c10 {__version__} but the build runs c10 "
                               f"{order.version}; install the same c10 on every worker and "
                               "restart them")
    # not installed here: the error says how to install it
    backend = engines.get_backend(order.backend)
    spec = _local_spec(order, Path(cache))
    out_dir = Path(cache) / "engines"
    key = engines.engine_key(spec, backend)
    out_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(out_dir / f".{key}.lock"):  # worker processes of one host share the cache
        path = engines.engine_path(out_dir, spec, backend)
        if key == order.key:
            _place_driver_engine(order, path)
        # reuses a valid one, else compiles here
        path, _ = engines.build_engine(spec, backend, out_dir)
    return engines.load_engine(path, spec, backend), key


def _local_spec(order: EngineOrder, cache: Path):
    """The driver's spec with its files written under `cache`, named by content hash."""
    spec = order.spec
    onnx = cache / "onnx" / f"{spec.onnx_hash}.onnx"
    if not onnx.is_file():
        atomic.write_bytes(onnx, order.onnx)
    calibration = None
    if order.calibration is not None:
        calibration = cache / "calibration" / f"{spec.calibration_hash}.cache"
        atomic.write_bytes(calibration, order.calibration)
    return dataclasses.replace(spec, onnx_path=onnx, calibration_path=calibration)


def _place_driver_engine(order: EngineOrder, path: Path) -> None:
    from c10.features.engines import sidecar_path

    sidecar = sidecar_path(path)
    if path.is_file() and sidecar.is_file():
        return
    atomic.write_bytes(path, order.engine)
    # last: an engine without its sidecar is never trusted
    atomic.write_bytes(sidecar, order.sidecar)


def _worker_runner(key: str) -> tuple[object, str]:
    """The engine of order `key` on this worker process, prepared once and kept."""
    with _WORKER_LOCK:
        if key not in _WORKER_RUNNERS:
            order = _WORKER_ORDERS.get(key)
            if order is None:
                raise EngineBuildError(f"this Dask worker holds no engine order {key[:12]}; "
                                       f"restart the workers ({_KEPT})")
            _WORKER_RUNNERS[key] = prepare_engine(order, worker_cache_dir())
        return _WORKER_RUNNERS[key]


class NamedBytes(io.BytesIO):
    """A tile's bytes that name the tile in error messages (the decoder formats its input)."""

    def __init__(self, name: str, data: bytes):
        super().__init__(data)
        self.tile = name

    def __str__(self) -> str:
        return self.tile


def embed_batch(key: str, prep, batch_size: int, names: Sequence[str],
                blobs: Sequence[bytes] | None) -> tuple[np.ndarray, str]:
    """The Dask task: descriptors of some tiles (their bytes, or paths the worker reads), and
    the key of the engine that computed them."""
    runner, used = _worker_runner(key)
    items = [NamedBytes(n, b) for n, b in zip(names, blobs)] if blobs is not None else list(names)
    return embed_tiles(runner, items, prep, batch_size), used


# --- driver side ---------------------------------------------------------------------------

_CLIENTS: dict[str, object] = {}
_ORDERS: dict[str, EngineOrder] = {}
_REGISTERED: set[tuple[str, str]] = set()
_DRIVER_LOCK = threading.Lock()


def connect(address: str, where: str) -> object:
    """This process's Client of the scheduler at `address` (shared by every shard thread)."""
    with _DRIVER_LOCK:
        client = _CLIENTS.get(address)
        if client is None or client.status not in ("running", "connecting"):
            client = _CLIENTS[address] = _new_client(address, where)
            # maybe a new scheduler
            _REGISTERED.difference_update({r for r in _REGISTERED if r[0] == address})
        return client


def _new_client(address: str, where: str):
    try:
        from distributed import Client
    except ImportError:
        raise ConfigError("c10.toml executor.kind = \"dask\" needs Dask on this machine: "
                          "pip install 'c10[cluster]' (and on every worker), "
                          "or set executor.kind = \"local\"") from None
    try:
        client = Client(address, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise DescriptorBatchError(f"{where}: cannot reach the Dask scheduler {address} ({exc}); "
                                   "start it (`dask scheduler`) or fix executor.scheduler in "
                                   f"c10.toml ({_KEPT})") from None
    try:
        client.wait_for_workers(1, timeout=CONNECT_TIMEOUT_S)
    except TimeoutError:
        client.close()
        raise DescriptorBatchError(f"{where}: the Dask scheduler {address} has no workers after "
                                   f"{CONNECT_TIMEOUT_S} s; start some (`dask worker {address}`) "
                                   f"({_KEPT})") from None
    return client


def close() -> None:
    """Close this process's scheduler connections (the in-process API and tests call it)."""
    with _DRIVER_LOCK:
        for client in _CLIENTS.values():
            client.close()
        _CLIENTS.clear()
        _REGISTERED.clear()


def engine_order(spec, backend_name: str, key: str, engine_path: Path) -> EngineOrder:
    """The driver's order for an engine key, read once per process."""
    with _DRIVER_LOCK:
        if key not in _ORDERS:
            _ORDERS[key] = EngineOrder.from_driver(spec, backend_name, key, engine_path)
        return _ORDERS[key]


def _register(client, address: str, order: EngineOrder) -> None:
    with _DRIVER_LOCK:
        if (address, order.key) not in _REGISTERED:
            client.register_plugin(EnginePlugin(order), name=plugin_name(order.key))
            _REGISTERED.add((address, order.key))


@dataclass
class ClusterEmbedder:
    """An `embed(paths) -> descriptors` for c10.shards.build_shard that runs on the cluster."""

    client: object
    key: str
    prep: object
    batch_size: int
    root: Path
    label: str                      # the shard, for messages
    worker_root: str | None = None  # tiles = "shared": the cache root as workers see it
    engines_used: set = dataclasses.field(default_factory=set)

    def __call__(self, paths: Sequence[Path]) -> np.ndarray:
        size = self.batch_size * BATCHES_PER_TASK
        chunks = [list(paths[i:i + size]) for i in range(0, len(paths), size)]
        token = uuid.uuid4().hex[:12]
        futures = [self.client.submit(embed_batch, self.key, self.prep, self.batch_size,
                                      *self._payload(chunk),
                                      key=f"{TASK_PREFIX}-{token}-{i}", pure=False)
                   for i, chunk in enumerate(chunks)]
        try:
            desc = self._collect(futures, [len(c) for c in chunks])
        finally:
            self.client.cancel(futures)  # after a failure, the other batches stop too
        _note_foreign(self.engines_used - {self.key})
        return desc

    def _payload(self, chunk: list[Path]) -> tuple[list[str], list[bytes] | None]:
        rels = [Path(p).relative_to(self.root).as_posix() for p in chunk]
        if self.worker_root is not None:
            return [f"{self.worker_root}/{rel}" for rel in rels], None
        return rels, [_read_tile(p) for p in chunk]

    def _collect(self, futures: list, counts: list[int]) -> np.ndarray:
        from distributed import as_completed

        parts: dict[str, np.ndarray] = {}
        with progress_bar(self.label.removeprefix("shards/"), sum(counts)) as advance:
            try:
                for future in as_completed(futures, loop=self.client.loop):
                    desc, used = future.result()  # a failed batch raises here, a cancelled one too
                    parts[future.key] = desc
                    self.engines_used.add(used)
                    advance(len(desc))
            except C10Error:
                raise
            except Exception as exc:
                # a worker lost too often, the scheduler gone, a cancelled batch
                raise DescriptorBatchError(
                    f"{self.label}: a batch of this block failed on the Dask cluster "
                    f"({type(exc).__name__}: {exc}); check the workers "
                    "(`dask worker` logs, memory limit), "
                    f"({_KEPT})") from None
        return np.concatenate([parts[f.key] for f in futures])


_NOTED: set[str] = set()


def _note_foreign(keys: set[str]) -> None:
    """Say once per engine that another host's engine computed descriptors: they agree with this
    host's only within the backends' numerical tolerance (a homogeneous cluster gives the same
    bytes)."""
    for key in sorted(keys - _NOTED):
        _NOTED.add(key)
        print(f"note: Dask workers on another host compiled and used their own engine {key[:12]}")


def _read_tile(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise DescriptorBatchError(f"{path}: tile vanished during the build") from None
    except OSError as exc:
        raise DescriptorBatchError(f"{path}: cannot read this tile ({exc.strerror}); "
                                   "fix its permissions or re-download it") from None


def cluster_embedder(executor, root: Path, label: str, engine: tuple, prep,
                     batch_size: int) -> Callable[[Sequence[Path]], np.ndarray]:
    """The embed callable of one shard action for c10.toml's [executor] kind = "dask"; `engine` is
    the driver's (spec, backend name, key, engine path). Connects on the first call only: a shard
    that reuses every row never touches the cluster."""
    worker_root = None
    if executor.tiles == "shared":
        worker_root = (executor.shared_root or str(root)).rstrip("/")

    def embed(paths: Sequence[Path]) -> np.ndarray:
        client = connect(executor.scheduler, label)
        order = engine_order(*engine)
        _register(client, executor.scheduler, order)
        return ClusterEmbedder(client, order.key, prep, batch_size, Path(root), label,
                               worker_root)(paths)

    return embed
