"""shards:{model}/{z}/{bx}-{by}: each block of tiles into a descriptor or local-feature shard."""
from __future__ import annotations

import os
import threading
import weakref
from pathlib import Path

from c10.rules import session
from c10.rules.adapters import action, changed, plan_or_none, presigned
from c10.rules.checker import TileState
from c10.store.layout import ref_relpath


def task_shards():
    """Embed each block of tiles into a descriptor shard (global) or a local-feature shard
    (local)."""
    from c10.rules.windows import window_tasks

    plan = plan_or_none()
    for model_plan in plan.shard_plans() if plan else ():
        for rel, tiles in model_plan.shards.items():
            yield {
                "name": rel.removeprefix("shards/").removesuffix(".npy"),
                "doc": f"{len(tiles)} tiles of {rel}, from {tiles[0].path} to {tiles[-1].path}",
                # the target is the ref naming the shard's content-named file (c10.store.refs)
                "targets": [ref_relpath(rel)],
                "task_dep": [f"engines:{model_plan.model.name}"],
                # the tiles are no file_dep: their content key, decided from the column
                # directories the scan stats (one doit file state per tile would cost more than
                # a whole no-op should); the identity is the same for every shard of the model
                "uptodate": [changed(model_plan.ident), block_state(plan, model_plan.blocks[rel]),
                             refs_current],
                "actions": [(action(build_shard), [model_plan.model.name, rel])],
            }
    if plan is not None:  # the global models' retrieval windows (shards.stride < 1)
        yield from window_tasks(plan)


def block_state(plan, block: tuple[int, int, int], reach: int = 0) -> TileState:
    """The uptodate of a task reading the block's tiles (reach 1: and the next column and row)."""
    return TileState(lambda: plan.block_key(block, reach))


def build_shard(name: str, rel: str) -> dict:
    """One block through the model: descriptors (global) or keypoints and descriptors (local)."""
    from c10.features.preprocess import Preprocessing
    from c10.features.shards import DESCRIPTORS, LOCAL_FEATURES, TileRecord, build_shard

    build = session.current()
    plan = build.begin_writing()
    model_plan = plan.plans[name]
    records = [TileRecord(t, *build.hashes.size_hash(t.path)) for t in model_plan.shards[rel]]
    prep = Preprocessing.from_model(model_plan.model)
    local = model_plan.model.role == "local"
    compute = _local(build, model_plan, prep) if local else _global(build, plan, model_plan, rel,
                                                                    prep)
    codec = LOCAL_FEATURES if local else DESCRIPTORS
    # rows are reused by tile bytes + identity from trusted shards only (never from what a ref
    # names: refs are hints)
    store = descriptor_store(build)
    fresh: list[str] = []  # the tiles computed (not reused): the BuildReport's rebuilt tiles

    def counted(paths):
        fresh.extend(Path(p).relative_to(build.root).as_posix() for p in paths)
        return compute(paths)

    stats = build_shard(build.root, rel, records, counted, model_plan.ident, codec,
                        store.reuser(model_plan.ident, codec.columns, rel))
    # rewriting every tile's hash after each small shard costs more than it saves
    build.hashes.save(min_interval=30.0)
    refs = published(build, {rel: stats.entry})
    store.add(_source(build.root, build.provenance, stats.entry["path"], (stats.entry["blake3"],)),
              [r.blake3 for r in records], model_plan.ident)
    return {"extracted" if local else "embedded": stats.embedded, "reused": stats.reused,
            "refs": refs, **({"fresh": fresh} if 0 < len(fresh) < len(records) else {})}


# One descriptor store per build's trust (its Provenance), shared by the shard threads.
_stores: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_stores_lock = threading.Lock()


def descriptor_store(build):
    """The build's c10.features.descriptor_store: rows from every shard file the last verified
    Manifest lists or a build of this host wrote (its ledger, this build's files included), then
    from the shards this build writes."""
    from c10.features.descriptor_store import DescriptorStore

    provenance, root = build.provenance, build.root
    with _stores_lock:
        store = _stores.get(provenance)
        if store is None:  # (what the store keeps refers to its key weakly: it goes with it)
            trust = weakref.ref(provenance)
            store = _stores[provenance] = DescriptorStore(lambda: trusted_shards(root, trust()),
                                                          lambda: trust().signed_tile_keys())
        return store


def trusted_shards(root, provenance, windows: bool = False) -> list:
    """A Source per trusted shard file, the signed ones first; each read back only if its bytes
    are still the trusted ones. windows: the window shards (rules/windows.py) instead of the
    tiles' (neither holds the other's rows)."""
    from c10.store.layout import SHARDS_DIR, WINDOWS_SUFFIX, split_tagged

    signed, written = provenance.signed, dict(provenance.ledger.files)
    sources = []
    for rel in [*signed, *(rel for rel in written if rel not in signed)]:
        split = split_tagged(rel) if rel.startswith(SHARDS_DIR + "/") else None
        if split is not None and split[0].endswith(WINDOWS_SUFFIX) == windows:
            digests = tuple(dict.fromkeys(d for d in (signed.get(rel), written.get(rel)) if d))
            sources.append(_source(root, provenance, rel, digests, split[0], rel in signed))
    return sources


def _source(root, provenance, rel: str, digests: tuple[str, ...], logical: str | None = None,
            listed: bool = False):
    from c10.features.descriptor_store import Source

    trust = weakref.ref(provenance)

    def read() -> bytes | None:
        for digest in digests:
            data = trust().read(rel, digest)
            if data is not None:
                return data
        return None

    return Source(root / rel, read, logical, listed)


def _global(build, plan, model_plan, rel, prep):
    """compute() of a descriptor shard: this host's engine, or the workers of a Dask cluster."""
    from c10.features.embedding import embed_tiles, progress_bar

    batch = model_plan.model.batch_size
    # the same shard writer; descriptors come from the workers
    if plan.config.executor.kind == "dask":
        from c10.features.cluster import cluster_embedder

        engine = (model_plan.spec, model_plan.backend.name, model_plan.engine_key,
                  build.root / model_plan.engine_rel)
        embed = cluster_embedder(plan.config.executor, build.root, rel, engine, prep, batch)
        return lambda paths: (embed(paths),)
    runner = build.runner(model_plan)

    def compute(paths):
        with progress_bar(rel.removeprefix("shards/"), len(paths)) as advance:
            return (embed_tiles(runner, paths, prep, batch, progress=advance),)

    return compute


def _local(build, model_plan, prep):
    from c10.features.embedding import extract_tiles

    runner = build.runner(model_plan)
    return lambda paths: extract_tiles(runner, paths, prep).columns()


def published(build, written: dict[str, dict]) -> dict[str, dict]:
    """The refs an action published (doit saves them for refs_current): this build wrote them, so
    their hashes are known and their bytes trusted."""
    for entry in written.values():
        build.hashes.remember(entry["path"], os.stat(build.root / entry["path"]), entry["blake3"])
        build.provenance.record(entry["path"], entry["blake3"])
    build.provenance.save(min_interval=30.0)
    return written


@presigned
def refs_current(task, values) -> bool:
    """doit uptodate of shard and index tasks: their refs are the ones doit recorded (not rewritten
    by a killed run) and name files whose bytes are still those (a deleted or damaged shard is
    rebuilt)."""
    from c10.store.refs import read_ref

    build = session.current()
    recorded = values.get("refs")
    if not recorded or len(recorded) != len(task.targets):
        return False
    for logical, entry in recorded.items():
        if read_ref(build.root, logical) != entry or _digest(build.hashes,
                                                             entry["path"]) != entry["blake3"]:
            return False
    return True


def _digest(hashes, rel: str) -> str | None:
    try:
        return hashes.hash(rel)[0]
    except OSError:
        return None

