"""The embedding stage on a real Dask LocalCluster (2 worker processes): same bytes as a local
build, a worker killed mid-build retried or failed cleanly, engines prepared for each worker's own
host."""
from __future__ import annotations

import dataclasses
import datetime as dt
import os
import re
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

from conftest import executed, make_cache  # noqa: E402

from c10.config import load_config  # noqa: E402
from c10.errors import ConfigError  # noqa: E402
from c10.features import cluster, engines  # noqa: E402
from c10.rules.driver import run_build  # noqa: E402
from c10.trust.keys import load_trusted_keys  # noqa: E402
from c10.trust.verify import verify_cache  # noqa: E402

# the scheduler's HTTP server falls back from a busy 8787 (other clusters on a shared host)
pytestmark = pytest.mark.filterwarnings("ignore:Port 8787 is already in use")


def cluster_cache(root: Path, inputs, key, executor: str = "") -> Path:
    """8x8-tile blocks (~10 tiles each), 2-tile model batches: two or more Dask tasks per shard."""
    make_cache(root, inputs, key, block=8)
    text = (root / "c10.toml").read_text().replace("batch_size = 32", "batch_size = 2")
    (root / "c10.toml").write_text(text + executor)
    return root


def dask_table(address: str, tiles: str = "bytes", shared_root: str = "") -> str:
    extra = f'shared_root = "{shared_root}"\n' if shared_root else ""
    return f'\n[executor]\nkind = "dask"\nscheduler = "{address}"\ntiles = "{tiles}"\n{extra}'


def build(root: Path, *args: str) -> int:
    """run_build; with -P thread doit's actions swap sys.stdout unlocked and may leave one of their
    captures in place (doit, not c10): put the test's streams back."""
    streams = sys.stdout, sys.stderr
    try:
        return run_build(root, list(args) or ["build_cache"])
    finally:
        swapped = sys.stdout is not streams[0]
        sys.stdout, sys.stderr = streams
        if swapped:
            print("note: doit -P thread left sys.stdout swapped", file=sys.__stderr__)


def cluster_key(root: Path) -> str:
    """The driver's engine key of the cache's global model (workers here share its host)."""
    from conftest import plan_of

    return plan_of(root).plans["global"].engine_key


def derived(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for sub in ("shards", "index") for p in sorted((root / sub).rglob("*")) if p.is_file()}


def verified(root: Path, pub: Path) -> int:
    result = verify_cache(root, trusted=load_trusted_keys([str(pub)]),
                          now=dt.datetime.now(dt.timezone.utc), state_path=None)
    return result.files


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("worker-cache")
    lc = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  memory_limit="1GiB", dashboard_address=None,
                                  env={cluster.WORKER_CACHE_ENV: str(cache_dir)})
    client = distributed.Client(lc, set_as_default=False)
    yield lc, client
    cluster.close()
    client.close()
    lc.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, inputs, operator_key) -> dict[str, bytes]:
    """Shards and index of the same cache built locally."""
    root = cluster_cache(tmp_path_factory.mktemp("local") / "cache", inputs, operator_key)
    assert run_build(root) == 0
    return derived(root)


@pytest.mark.parametrize("tiles, args", [("bytes", ["-n", "2", "-P", "thread"]), ("shared", [])])
def test_cluster_build_is_byte_identical_to_a_local_one(local_cluster, reference, tmp_path, inputs,
                                                        operator_key, capsys, tiles, args):
    lc, client = local_cluster
    root = tmp_path / "cache"
    cluster_cache(root, inputs, operator_key, dask_table(lc.scheduler_address, tiles, str(root)))
    assert build(root, *args, "build_cache") == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert (sum(name.startswith("shards:") for name in executed(out))
            == len(list((root / "shards").rglob("*.npy"))))
    assert derived(root) == reference
    assert verified(root, operator_key[1]) > 0
    # engines loaded once per worker process
    loaded = client.run(lambda: sorted(cluster._WORKER_RUNNERS))
    assert all(keys in ([], [cluster_key(root)]) for keys in loaded.values()), loaded
    assert build(root) == 0
    out = capsys.readouterr()
    assert executed(out.out + out.err) == ["coverage"], out


def _kill_first_batch(marker: str):
    """A worker plugin that SIGKILLs the first worker to start a c10 batch (defined here, pickled by
    value)."""

    class KillFirstBatch(distributed.WorkerPlugin):
        name = "kill-first-c10-batch"

        def transition(self, key, start, finish, **kwargs):
            if finish == "executing" and str(key).startswith(cluster.TASK_PREFIX):
                try:
                    os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    return
                os.kill(os.getpid(), signal.SIGKILL)

    return KillFirstBatch()


@pytest.fixture
def killer(local_cluster, tmp_path):
    lc, client = local_cluster
    marker = tmp_path / "killed"
    client.register_plugin(_kill_first_batch(str(marker)))
    yield marker
    client.unregister_worker_plugin("kill-first-c10-batch")
    lc.scheduler.allowed_failures = 3
    client.wait_for_workers(2, timeout=60)


def test_worker_killed_mid_build_is_retried_by_dask(local_cluster, killer, reference, tmp_path,
                                                   inputs, operator_key, capsys):
    lc, _ = local_cluster
    root = cluster_cache(tmp_path / "cache", inputs, operator_key, dask_table(lc.scheduler_address))
    code = build(root, "-n", "2", "-P", "thread", "build_cache")
    assert killer.exists()
    assert code == 0, capsys.readouterr().out
    assert derived(root) == reference and verified(root, operator_key[1]) > 0


def test_worker_lost_fails_the_shard_cleanly_and_a_rerun_completes(local_cluster, killer,
                                                                  reference, tmp_path, inputs,
                                                                  operator_key, capsys):
    lc, _ = local_cluster
    lc.scheduler.allowed_failures = 0  # no retry: the lost batch fails its shard
    root = cluster_cache(tmp_path / "cache", inputs, operator_key, dask_table(lc.scheduler_address))
    assert run_build(root) == 1
    out = capsys.readouterr().out
    assert killer.exists()
    assert "DescriptorBatchError: shards/global/15/" in out and "failed on the Dask cluster" in out
    assert "run `doit build_cache` again" in out
    assert not (root / "Manifest.json").exists()
    # nothing half-written
    assert not [p for p in (root / "shards").rglob("*") if p.name.endswith(".tmp")]
    lc.scheduler.allowed_failures = 3
    assert run_build(root) == 0, capsys.readouterr().out
    assert derived(root) == reference and verified(root, operator_key[1]) > 0


# --- engines per worker host, in this process (the worker's code path, no scheduler) ------------

@pytest.fixture
def driver_engine(tmp_path, inputs, operator_key):
    """(spec, backend, engine path) of a cache's global model, as the driver's graph holds them."""
    from conftest import plan_of

    root = cluster_cache(tmp_path / "cache", inputs, operator_key)
    assert run_build(root, ["engines"]) == 0
    model_plan = plan_of(root).plans["global"]
    return model_plan.spec, model_plan.backend, root / model_plan.engine_rel


def test_worker_with_the_drivers_key_uses_the_drivers_engine(driver_engine, tmp_path):
    spec, backend, path = driver_engine
    order = cluster.EngineOrder.from_driver(spec, backend.name, engines.engine_key(spec, backend),
                                            path)
    runner, key = cluster.prepare_engine(order, tmp_path / "worker")
    assert key == order.key
    placed = engines.engine_path(tmp_path / "worker" / "engines", spec, backend)
    assert placed.read_bytes() == path.read_bytes()
    batch = np.random.default_rng(0).standard_normal((2, *spec.input_shape), dtype=np.float32)
    assert np.array_equal(runner(batch), engines.load_engine(path, spec, backend)(batch))


def test_worker_on_another_host_compiles_its_own_engine_and_never_uses_the_drivers(driver_engine,
                                                                                  tmp_path):
    spec, backend, path = driver_engine
    # The driver's key and engine as from a host whose fingerprint differs from this one's.
    order = dataclasses.replace(cluster.EngineOrder.from_driver(spec, backend.name, "f" * 64, path),
                                engine=b"not an engine for this host")
    runner, key = cluster.prepare_engine(order, tmp_path / "worker")
    assert key == engines.engine_key(spec, backend) != order.key
    built = sorted((tmp_path / "worker" / "engines").glob("*.onnx"))
    assert ([p.name for p in built] == [f"global-{key}.onnx"]
            and b"not an engine" not in built[0].read_bytes())
    batch = np.random.default_rng(0).standard_normal((2, *spec.input_shape), dtype=np.float32)
    assert np.array_equal(runner(batch), engines.load_engine(path, spec, backend)(batch))


def test_worker_of_another_c10_version_refuses(driver_engine, tmp_path):
    spec, backend, path = driver_engine
    order = dataclasses.replace(cluster.EngineOrder.from_driver(spec, backend.name, "0" * 64, path),
                                version="0.0.1")
    with pytest.raises(engines.EngineBuildError, match="install the same c10 on every worker"):
        cluster.prepare_engine(order, tmp_path / "worker")


@pytest.mark.parametrize("table, needle", [
    ('kind = "dask"', "`executor.scheduler` is required"),
    ('kind = "ray"', "`executor.kind` = 'ray'; allowed: local, dask"),
    ('tiles = "nfs"', "`executor.tiles` = 'nfs'; allowed: bytes, shared"),
    ('shared_root = "mnt/x"', "`executor.shared_root` must be an absolute path"),
    ("workers = 4", "unknown key `executor.workers`"),
])
def test_bad_executor_table_is_named(tmp_path, inputs, operator_key, table, needle):
    root = cluster_cache(tmp_path / "cache", inputs, operator_key, f"\n[executor]\n{table}\n")
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(root)


def test_unreachable_scheduler_fails_the_shard_saying_what_to_do(tmp_path, inputs, operator_key,
                                                                capsys, monkeypatch):
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT_S", 2)
    root = cluster_cache(tmp_path / "cache", inputs, operator_key, dask_table("tcp://127.0.0.1:9"))
    assert run_build(root) == 1
    out = capsys.readouterr().out
    assert "cannot reach the Dask scheduler tcp://127.0.0.1:9" in out and "`dask scheduler`" in out
    assert not (root / "shards").exists() or not list((root / "shards").rglob("*.npy"))
