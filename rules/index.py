"""index:{model}: each global model's FAISS index and id map, from all its shards."""
from __future__ import annotations

import dataclasses

from c10.rules import session
from c10.rules.adapters import action, changed, plan_or_none
from c10.rules.shards import published, refs_current
from c10.store.layout import ref_relpath


def task_index():
    """Build each global model's FAISS index from all its shards."""
    plan = plan_or_none()
    for model_plan in plan.embedding_plans() if plan else ():
        if not model_plan.shards:
            continue
        yield {
            "name": model_plan.model.name,
            "doc": f"FAISS {plan.config.index.factory} index over {len(plan.tiles)} tiles",
            "file_dep": [ref_relpath(rel) for rel in model_plan.shards],
            "targets": [ref_relpath(rel) for rel in model_plan.index_rels],
            "uptodate": [changed(dataclasses.asdict(plan.config.index)), refs_current],
            "actions": [(action(build_index), [model_plan.model.name])],
        }


def build_index(name: str) -> dict:
    import io

    from c10.features.index import build_index

    build = session.current()
    plan = build.begin_writing()
    model_plan = plan.plans[name]
    # each shard as this build wrote it or the last signed Manifest lists it: a forged ref fails
    shards = [io.BytesIO(build.provenance.current(rel)[1]) for rel in sorted(model_plan.shards)]
    rows, entries = build_index(build.root, name, shards, plan.config.index)
    return {"rows": rows, "refs": published(build, dict(zip(model_plan.index_rels, entries)))}
