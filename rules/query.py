"""`c10 query`/`selftest` glue: the cache's own engine, preprocessing and index, from the load-time graph."""
from __future__ import annotations

from pathlib import Path

from c10.errors import ConfigError
from rules import graph as graph_mod


def open_searcher(root: Path, model: str | None = None):
    """(Searcher, model name) for a global model of the cache at `root` (default: its first one)."""
    from c10 import engines
    from c10.preprocess import Preprocessing
    from c10.query import Searcher, load_index_checked

    try:
        graph = graph_mod.load_graph(root)
        plans = {p.model.name: p for p in graph.embedding_plans()}
        if not plans:
            raise ConfigError(f"{graph.root / 'c10.toml'}: no model with role = \"global\"; nothing to query")
        name = model or next(iter(plans))
        if name not in plans:
            raise ConfigError(f"{graph.root / 'c10.toml'}: no global model {name!r}; "
                              f"the global models are: {', '.join(plans)}")
        plan = plans[name]
        index, ids = load_index_checked(graph.root, name)
        runner = engines.load_engine(graph.root / plan.engine_rel, plan.spec, plan.backend)
        paths = {t.id: t.path for t in graph.tiles}
        searcher = Searcher(runner, Preprocessing.from_model(plan.model), index, ids,
                            graph.config.index.metric, paths, plan.model.batch_size)
        return searcher, name, graph.root
    finally:
        graph_mod.reset(save=False)  # a query writes nothing, and gets the garbage collector back


def open_verifier(root: Path):
    """Verifier over the cache's first local and first matcher model (`c10 query --verify`)."""
    from c10 import engines
    from c10.localize import Verifier
    from c10.preprocess import Preprocessing

    try:
        graph = graph_mod.load_graph(root)
        roles = {}
        for plan in graph.plans.values():
            roles.setdefault(plan.model.role, plan)
        missing = [r for r in ("local", "matcher") if r not in roles]
        if missing:
            raise ConfigError(f"{graph.root / 'c10.toml'}: --verify needs a model with role = \"local\" and one "
                              f"with role = \"matcher\" (missing: {', '.join(missing)}); `c10 export-models` "
                              "writes both and prints their tables")
        local, matcher = roles["local"], roles["matcher"]
        load = lambda plan: engines.load_engine(graph.root / plan.engine_rel, plan.spec, plan.backend)  # noqa: E731
        return Verifier(graph.root, load(local), Preprocessing.from_model(local.model), load(matcher),
                        local.model.name, graph.config.shards.block)
    finally:
        graph_mod.reset(save=False)
