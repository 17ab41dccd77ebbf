"""The build graph's task generators: engines, shards, index, coverage gate, manifest, build_cache."""
from __future__ import annotations

import hashlib
import inspect
from pathlib import Path

from doit.tools import config_changed

from c10.errors import C10Error
from c10.paths import ref_relpath
from rules import actions, session
from rules.graph import load_graph
from rules.session import action


def _presigned(check):
    """`check` with its signature attached: doit calls inspect.signature() on every uptodate callable
    of every task on every run (for its `task`/`values` arguments), ~20 µs each, 900 calls at 100k
    tiles; inspect answers a set __signature__ at once (PEP 362)."""
    check.__signature__ = inspect.signature(check)
    return check


_SIGNATURE = inspect.signature(config_changed(""))
_refs_current, _manifest_fresh = _presigned(actions.refs_current), _presigned(actions.manifest_fresh)


def _changed(config) -> config_changed:
    """doit's config_changed(config), presigned (see _presigned)."""
    check = config_changed(config)
    check.__signature__ = _SIGNATURE
    return check


def _graph():
    """The loaded graph, or None when the request is invalid (build_cache then reports why)."""
    session.mark_start()
    try:
        return load_graph()
    except C10Error:
        return None


def task_engines():
    """Compile each model into an engine for this host, named by its identity key."""
    graph = _graph()
    for name, plan in (graph.plans.items() if graph else ()):
        deps = [str(plan.model.path.resolve())]
        if plan.spec.calibration_path is not None:
            deps.append(str(Path(plan.spec.calibration_path).resolve()))
        yield {
            "name": name,
            "doc": f"engine of model {name} ({plan.backend.name})",
            "file_dep": deps,
            "targets": [plan.engine_rel, plan.sidecar_rel],
            "uptodate": [_changed({"engine_key": plan.engine_key})],
            "actions": [(action(actions.build_engine), [name])],
            # no "clean": engines are removed only by `doit prune --apply` (GC is explicit)
        }


def task_shards():
    """Embed each block of tiles into a descriptor shard (global) or a local-feature shard (local)."""
    graph = _graph()
    for plan in graph.shard_plans() if graph else ():
        build = actions.build_shard if plan.model.role == "global" else actions.build_local_shard
        for rel, tiles in plan.shards.items():
            yield {
                "name": rel.removeprefix("shards/").removesuffix(".npy"),
                "doc": f"{len(tiles)} tiles of {rel}",
                "file_dep": [t.path for t in tiles],
                # the target is the ref naming the shard's content-named file (c10.refs)
                "targets": [ref_relpath(rel)],
                "task_dep": [f"engines:{plan.model.name}"],
                # the tile list is in the key: a removed tile must rebuild its shard
                "uptodate": [_changed(_shard_key(plan.ident, tiles)), _refs_current],
                "actions": [(action(build), [plan.model.name, rel])],
            }


def _shard_key(ident: str, tiles) -> str:
    """Embedding identity + the block's tile list, as one digest (a removed tile changes it);
    a string, so config_changed stores it as is instead of json-dumping 100k paths per load."""
    digest = hashlib.sha256(ident.encode())
    digest.update("\n".join([t.path for t in tiles]).encode())
    return digest.hexdigest()


def task_index():
    """Build each global model's FAISS index from all its shards."""
    graph = _graph()
    for plan in graph.embedding_plans() if graph else ():
        if not plan.shards:
            continue
        yield {
            "name": plan.model.name,
            "doc": f"FAISS {graph.config.index.factory} index over {len(graph.tiles)} tiles",
            "file_dep": [ref_relpath(rel) for rel in plan.shards],
            "targets": [ref_relpath(rel) for rel in plan.index_rels],
            "uptodate": [_changed(actions.index_params(graph)), _refs_current],
            "actions": [(action(actions.build_index), [plan.model.name])],
        }


def task_coverage():
    """Gate: fail if any file under the cache is declared by no task (always runs)."""
    if _graph() is None:
        return {"actions": None}
    return {
        "actions": [action(actions.check_coverage)],
        "task_dep": ["engines", "shards", "index"],
        "verbosity": 2,
    }


def task_manifest():
    """Write Manifest.json and its signed DSSE envelope: the build's single commit point."""
    graph = _graph()
    if graph is None:
        return {"actions": None}
    return {
        "file_dep": actions.manifest_deps(graph),
        "targets": ["Manifest.json", "Manifest.json.dsse"],
        "task_dep": ["coverage"],
        "uptodate": [_changed(actions.manifest_settings(graph)), _manifest_fresh],
        "actions": [action(actions.write_manifest)],
    }


def task_build_cache():
    """Build the whole takeoff cache (the default task)."""
    if _graph() is None:
        return {"actions": [action(load_graph)], "verbosity": 2}  # fails with the request's error
    return {"actions": None, "task_dep": ["manifest"]}


def task_prune():
    """List stale engines and leftovers (engines of other keys); `doit prune --apply` removes them."""
    if _graph() is None:
        return {"actions": None}
    return {
        "actions": [action(actions.prune)],
        "params": [{"name": "apply", "long": "apply", "type": bool, "default": False,
                    "help": "remove the listed files (default: only list them)"}],
        "uptodate": [False],
        "verbosity": 2,
    }
