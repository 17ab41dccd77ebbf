"""shards:{model}/{z}/{bx}-{by}.windows: a block's retrieval windows into a descriptor shard."""
from __future__ import annotations

import threading
import weakref

from c10.rules import session
from c10.rules.adapters import action, changed
from c10.store.layout import ref_relpath


def window_tasks(plan):
    """One task per block with windows (c10.features.windows), in the shards stage: its tiles'
    key covers the block and the next column and row (the tiles its windows cover), so doit
    re-runs exactly the window shards that hold a changed tile."""
    from c10.features.window_grid import WINDOW_CODE
    from c10.rules.shards import block_state, refs_current

    div = plan.config.shards.div
    for model_plan in plan.embedding_plans():
        name = model_plan.model.name
        for rel, covered in model_plan.windows.items():
            yield {
                "name": rel.removeprefix("shards/").removesuffix(".npy"),
                "doc": f"windows at stride 1/{div} over {len(covered.tiles)} tiles of {rel}",
                "targets": [ref_relpath(rel)],
                "task_dep": [f"engines:{name}"],
                # which windows exist follows from the covered tiles, which the tiles' key holds
                "uptodate": [changed(f"{model_plan.ident} {div} {WINDOW_CODE}"),
                             block_state(plan, covered.block, reach=1), refs_current],
                "actions": [(action(build_windows), [name, rel])],
            }


def build_windows(name: str, rel: str) -> dict:
    """Cut and embed the block's windows no trusted shard holds a row for (by window key and
    identity); always on this host's engine, also with the Dask executor."""
    from c10.features.embedding import progress_bar
    from c10.features.preprocess import Preprocessing
    from c10.features.windows import build_window_shard
    from c10.rules.shards import _source, published

    build = session.current()
    plan = build.begin_writing()
    model_plan = plan.plans[name]
    covered = model_plan.windows[rel]
    windows = covered.windows(plan.config.shards.block, plan.config.shards.div)
    digests = {t.path: build.hashes.hash(t.path)[0] for t in covered.tiles}
    store = window_store(build)
    with progress_bar(rel.removeprefix("shards/"), len(windows)) as advance:
        stats, keys = build_window_shard(
            build.root, rel, windows, plan.config.shards.div, digests, build.runner(model_plan),
            Preprocessing.from_model(model_plan.model), model_plan.model.batch_size,
            model_plan.ident, store.reuser(model_plan.ident, ("desc",), rel), advance)
    build.hashes.save(min_interval=30.0)
    refs = published(build, {rel: stats.entry})
    store.add(_source(build.root, build.provenance, stats.entry["path"], (stats.entry["blake3"],)),
              keys, model_plan.ident)
    return {"embedded": stats.embedded, "reused": stats.reused, "windows": stats.tiles,
            "refs": refs}


# One store of window rows per build's trust (its Provenance), shared by the shard threads: only
# window shards are its sources, and it has no `listed` shortcut (a window key is no tile's blake3).
_stores: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_stores_lock = threading.Lock()


def window_store(build):
    from c10.features.descriptor_store import DescriptorStore
    from c10.rules.shards import trusted_shards

    provenance, root = build.provenance, build.root
    with _stores_lock:
        store = _stores.get(provenance)
        if store is None:
            trust = weakref.ref(provenance)
            store = _stores[provenance] = DescriptorStore(
                lambda: trusted_shards(root, trust(), windows=True))
        return store
