"""Open a built cache's engines, preprocessing, index and local shards, writing nothing."""
from __future__ import annotations

from pathlib import Path

from c10.errors import ConfigError
from c10.plan import Plan, load_plan
from c10.store.hashcache import HashCache


def _plan(root: Path) -> Plan:
    return load_plan(root, HashCache(root), memo=False)  # nothing saved: a query writes nothing


def open_searcher(root: Path, model: str | None = None):
    """(Searcher, model name, root) for a global model of the cache at `root` (default: its
    first)."""
    from c10.features import engines
    from c10.features.preprocess import Preprocessing
    from c10.query.search import Searcher, load_index_checked

    plan = _plan(root)
    plans = {p.model.name: p for p in plan.embedding_plans()}
    if not plans:
        raise ConfigError(f"{plan.root / 'c10.toml'}: no model with role = \"global\"; "
                          "nothing to query")
    name = model or next(iter(plans))
    if name not in plans:
        raise ConfigError(f"{plan.root / 'c10.toml'}: no global model {name!r}; "
                          f"the global models are: {', '.join(plans)}")
    model_plan = plans[name]
    index, ids = load_index_checked(plan.root, name)
    runner = engines.load_engine(plan.root / model_plan.engine_rel, model_plan.spec,
                                 model_plan.backend)
    paths = {t.id: t.path for t in plan.tiles}
    searcher = Searcher(runner, Preprocessing.from_model(model_plan.model), index, ids,
                        plan.config.index.metric, paths, model_plan.model.batch_size)
    return searcher, name, plan.root


def open_reranker(root: Path):
    """Reranker over the cache's first local and first matcher model (`c10 query --rerank`)."""
    from c10.features import engines
    from c10.features.preprocess import Preprocessing
    from c10.query.rerank import Reranker

    plan = _plan(root)
    roles = {}
    for model_plan in plan.plans.values():
        roles.setdefault(model_plan.model.role, model_plan)
    missing = [r for r in ("local", "matcher") if r not in roles]
    if missing:
        raise ConfigError(f"{plan.root / 'c10.toml'}: --rerank needs a model with "
                          "role = \"local\" and one "
                          f"with role = \"matcher\" (missing: {', '.join(missing)})",
                          fix="`c10 export-models` writes both and prints their tables")
    local, matcher = roles["local"], roles["matcher"]

    def load(model_plan):
        return engines.load_engine(plan.root / model_plan.engine_rel, model_plan.spec,
                                   model_plan.backend)

    return Reranker(plan.root, load(local), Preprocessing.from_model(local.model), load(matcher),
                    local.model.name, plan.config.shards.block)
