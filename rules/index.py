"""index:{model}: each global model's FAISS index and id map, from all its shards."""
from __future__ import annotations

import dataclasses
import shutil

from c10.config import IVF_KEYS
from c10.rules import session
from c10.rules.adapters import action, changed, plan_or_none
from c10.rules.shards import published, refs_current
from c10.store.layout import IVF_CACHE_DIR, ref_relpath


def task_index():
    """Build each global model's FAISS index from all its shards."""
    plan = plan_or_none()
    for model_plan in plan.embedding_plans() if plan else ():
        if not model_plan.shards:
            continue
        yield {
            "name": model_plan.model.name,
            "doc": f"FAISS {plan.config.index.factory} index over {len(plan.tiles)} tiles"
                   + (" and their windows" if model_plan.windows else ""),
            "file_dep": [ref_relpath(rel) for rel in [*model_plan.shards, *model_plan.windows]],
            "targets": [ref_relpath(rel) for rel in [*model_plan.index_rels,
                                                     *model_plan.trained]],
            "uptodate": [changed(index_key(plan)), refs_current],
            "actions": [(action(build_index), [model_plan.model.name])],
        }


def index_key(plan) -> dict:
    """The index parameters, and the stride when there are windows (a stride back to 1 drops the
    window shards from file_dep, which doit alone would not notice); the IVF keys only for an IVF
    factory (others keep the key they had before those keys)."""
    key = dataclasses.asdict(plan.config.index)
    if not plan.config.index.grows:
        key = {k: v for k, v in key.items() if k not in IVF_KEYS}
    div = plan.config.shards.div
    return key | {"div": div} if div != 1 else key  # tiles only: today's key, no re-run


def build_index(name: str) -> dict:
    import io

    from c10.features.index import build_index

    build = session.current()
    plan = build.begin_writing()
    model_plan = plan.plans[name]
    if model_plan.trained:
        from c10.rules.ivf import grow

        return grow(build, plan, model_plan)
    # an IVF factory's cached encodings, if the factory was one before, are of no more use
    shutil.rmtree(build.root / IVF_CACHE_DIR / name, ignore_errors=True)
    # each shard as this build wrote it or the last signed Manifest lists it: a forged ref fails
    shards, windows = ([io.BytesIO(build.provenance.current(rel)[1]) for rel in sorted(rels)]
                       for rels in (model_plan.shards, model_plan.windows))
    rows, entries = build_index(build.root, name, shards, plan.config.index, windows,
                                plan.config.shards.div)
    return {"rows": rows, "refs": published(build, dict(zip(model_plan.index_rels, entries)))}
