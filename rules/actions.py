"""What each task runs: thin calls from the loaded graph into the doit-free domain code."""
from __future__ import annotations

import datetime as dt
import getpass
import os
import platform
import sys
import threading
import uuid
from pathlib import Path

from c10 import __version__
from c10.errors import ManifestCoverageError, MissingTilesError, SigningKeyError
from rules import session
from c10.paths import ENGINES_DIR
from rules.graph import Graph, collector_back_on, hash_cache, load_graph, save_scan_memo

_RUNNERS: dict[str, object] = {}
_RUNNERS_LOCK = threading.Lock()


def build_engine(name: str) -> dict:
    from c10 import engines

    from c10.export import check_backend

    graph = _begin()
    plan = graph.plans[name]
    check_backend(plan.spec.onnx_path, name, plan.backend.name)  # DeformConv vs OpenVINO: say the fix
    _, built = engines.build_engine(plan.spec, plan.backend, graph.root / ENGINES_DIR)
    return {"built": built}


def _runner(graph: Graph, name: str):
    """The model's loaded engine, kept for the whole process (loading is slower than a small shard)."""
    from c10 import engines

    plan = graph.plans[name]
    path = graph.root / plan.engine_rel
    with _RUNNERS_LOCK:  # `doit -P thread`: shard threads share one loaded engine
        if path not in _RUNNERS:
            _RUNNERS[path] = engines.load_engine(path, plan.spec, plan.backend)
        return _RUNNERS[path]


def _shard_inputs(name: str, rel: str):
    """(graph, plan, hash cache, tile records, preprocessing) of one shard task, key checked and locked."""
    from c10.preprocess import Preprocessing
    from c10.shards import TileRecord

    graph = _begin()
    plan = graph.plans[name]
    hashes = hash_cache()
    records = [TileRecord(t, *_size_hash(hashes, t.path)) for t in plan.shards[rel]]
    return graph, plan, hashes, records, Preprocessing.from_model(plan.model)


def build_shard(name: str, rel: str) -> dict:
    from c10.shards import build_shard as build, embed_tiles, progress_bar

    graph, plan, hashes, records, prep = _shard_inputs(name, rel)
    if graph.config.executor.kind == "dask":  # the same shard writer; descriptors come from the workers
        from c10.cluster import cluster_embedder

        engine = (plan.spec, plan.backend.name, plan.engine_key, graph.root / plan.engine_rel)
        embed = cluster_embedder(graph.config.executor, graph.root, rel, engine, prep, plan.model.batch_size)
    else:
        runner = _runner(graph, name)

        def embed(paths):
            with progress_bar(rel.removeprefix("shards/"), len(paths)) as advance:
                return embed_tiles(runner, paths, prep, plan.model.batch_size, progress=advance)

    stats = build(graph.root, rel, records, embed, plan.ident)
    hashes.save(min_interval=30.0)  # rewriting every tile's hash after each small shard costs more than it saves
    return {"embedded": stats.embedded, "reused": stats.reused, "refs": _published(graph, {rel: stats.entry})}


def build_local_shard(name: str, rel: str) -> dict:
    from c10.local_shards import build_local_shard as build, extract_tiles

    graph, plan, hashes, records, prep = _shard_inputs(name, rel)
    runner = _runner(graph, name)
    stats = build(graph.root, rel, records, lambda paths: extract_tiles(runner, paths, prep), plan.ident)
    hashes.save(min_interval=30.0)
    return {"extracted": stats.embedded, "reused": stats.reused, "refs": _published(graph, {rel: stats.entry})}


def _published(graph: Graph, written: dict[str, dict]) -> dict[str, dict]:
    """The refs an action published (doit saves them for refs_current); their hashes are known."""
    hashes = hash_cache()
    for entry in written.values():
        hashes.remember(entry["path"], os.stat(graph.root / entry["path"]), entry["blake3"])
    return written


def refs_current(task, values) -> bool:
    """doit uptodate of shard and index tasks: their refs are the ones doit recorded (not rewritten
    by a killed run) and name files whose bytes are still those (a deleted or damaged shard is rebuilt)."""
    from c10.refs import read_ref

    recorded, root, hashes = values.get("refs"), load_graph().root, hash_cache()
    if not recorded or len(recorded) != len(task.targets):
        return False
    for logical, entry in recorded.items():
        if read_ref(root, logical) != entry or _digest(hashes, entry["path"]) != entry["blake3"]:
            return False
    return True


def _digest(hashes, rel: str) -> str | None:
    try:
        return hashes.hash(rel)[0]
    except OSError:
        return None


def _size_hash(hashes, rel: str) -> tuple[int, str]:
    digest, st = hashes.hash(rel)
    return st.st_size, digest


def index_params(graph: Graph) -> dict:
    cfg = graph.config.index
    return {"factory": cfg.factory, "metric": cfg.metric,
            "ef_construction": cfg.ef_construction, "ef_search": cfg.ef_search}


def build_index(name: str) -> dict:
    from c10.index import build_index as build

    graph = _begin()
    plan = graph.plans[name]
    rows, entries = build(graph.root, name, [_current(graph, rel) for rel in sorted(plan.shards)],
                          graph.config.index)
    return {"rows": rows, "refs": _published(graph, dict(zip(plan.index_rels, entries)))}


def _current(graph: Graph, logical: str) -> Path:
    return graph.root / _ref_entry(graph, logical)["path"]


def _ref_entry(graph: Graph, logical: str) -> dict:
    """The build's current entry for `logical`, or IndexBuildError saying what to run."""
    from c10.errors import IndexBuildError
    from c10.refs import read_ref

    entry = read_ref(graph.root, logical)
    if entry is None:
        raise IndexBuildError(f"{graph.root}: the build has no {logical} (its ref .c10/refs/{logical}.json is "
                              "missing or damaged); run `doit build_cache` again")
    return entry


def committed_owned(graph: Graph):
    """committed() -> the shards and index files the last Manifest lists, parsed on first call."""
    from functools import cache

    from c10.refs import committed_files

    return cache(lambda: set(committed_files(graph.root)))


def live_files(graph: Graph) -> set[str]:
    """The content-named shard and index files the build's refs name now."""
    from c10.refs import read_ref

    entries = (read_ref(graph.root, rel) for rel in graph.owned_logicals())
    return {e["path"] for e in entries if e}


def check_coverage() -> None:
    """Remove dead graph-owned files (ninja's cleandead), then fail on any undeclared file."""
    from c10.coverage import find_orphans, remove_dead
    from c10.refs import remove_stale_refs
    from c10.tiles import TILES_DIR

    graph = load_graph()
    collector_back_on()
    session.ensure_locked(graph.root)
    _roll_forward(graph.root)
    if not graph.tiles:
        raise MissingTilesError(
            f"{graph.root}: no tiles in scope (bbox {list(graph.config.area.bbox)}, zooms "
            f"{list(graph.config.area.zooms)}); fetch tiles into tiles/{{z}}/{{x}}/{{y}}.jpg first "
            f"(or `c10 import {graph.root} SOURCE`), then re-run `doit build_cache`")
    declared, live, committed = graph.declared(tiles=False), live_files(graph), committed_owned(graph)
    # shards/ and index/ keep the build's current files and, until the next commit, the last Manifest's
    removed = remove_dead(graph.root, live, committed) + remove_stale_refs(graph.root, set(graph.owned_logicals()))
    # tiles/ was listed file by file when the graph loaded: its orphans are known, no second walk
    orphans = find_orphans(graph.root, declared | live, TILES_DIR, graph.strays + [t.path for t in graph.out_of_scope])
    orphans = [rel for rel in orphans if rel not in committed()] if orphans else orphans
    if orphans:
        raise ManifestCoverageError(_orphan_message(graph, orphans))
    for rel in removed:
        print(f"removed dead {rel}")
    # hashes the checker computed this run (a mass `touch`): saved once, never computed again
    hash_cache().save()
    save_scan_memo(graph.root)
    _check_complete(graph)


def _check_complete(graph: Graph) -> None:
    """area.require_complete: the Manifest is signed only over the whole requested area."""
    from c10.tiles import Scope

    area = graph.config.area
    expected = Scope(area.bbox, area.zooms).expected_count()
    if area.require_complete and len(graph.tiles) < expected:
        raise MissingTilesError(
            f"{graph.root}: {expected - len(graph.tiles)} of {expected} tiles of area.bbox/zooms are missing "
            f"and area.require_complete = true; fetch them (or `c10 import {graph.root} SOURCE`), see which "
            f"with `c10 map {graph.root} -o map.png`, then re-run `doit build_cache`; the previous Manifest "
            "stays in force")


def _roll_forward(root: Path) -> None:
    """A build killed between the Manifest's two renames left a torn commit: complete it first."""
    from c10.manifest import roll_forward

    version = roll_forward(root)
    if version is not None:
        print(f"warning: a build was cut between writing Manifest.json.dsse and Manifest.json; "
              f"rolled Manifest.json forward to the signed version {version}")


def _orphan_message(graph: Graph, orphans: list[str]) -> str:
    shown = ", ".join(orphans[:5]) + (f" and {len(orphans) - 5} more" if len(orphans) > 5 else "")
    hints = []
    if any(o.startswith(ENGINES_DIR + "/") for o in orphans):
        hints.append("`doit prune` lists stale engines and `doit prune --apply` removes them")
    if any(o.startswith("tiles/") for o in orphans):
        hints.append("tiles outside area.bbox/zooms or not named tiles/{z}/{x}/{y}.{jpg,png,webp} "
                      "must be moved out of the cache or the area widened in c10.toml")
    hints.append("move any other file out of the cache")
    return (f"{len(orphans)} file(s) under {graph.root} are declared by no task: {shown}; "
            + "; ".join(hints) + "; the previous Manifest stays in force")


def prune(apply: bool) -> None:
    """List (and with --apply remove) stale derived files; never inputs or unrecognised files."""
    from c10.prune import remove_files, stale_files

    graph = load_graph()
    stale, unknown = stale_files(graph.root, graph.declared())
    for rel in stale:
        print(f"{'removing' if apply else 'stale'} {rel}")
    for rel in unknown:
        print(f"not c10's, left alone: {rel} (move it out of the cache yourself)")
    if apply and stale:
        session.ensure_locked(graph.root)
        print(f"freed {remove_files(graph.root, stale) / 1e6:.1f} MB; run `doit build_cache` to re-sign")
    elif stale:
        print(f"{len(stale)} stale file(s); `doit prune --apply` removes them")


def manifest_deps(graph: Graph) -> list[str]:
    """Every shipped file but the tiles (whose sizes and hashes the shards carry); shards and
    index files through the refs that name them."""
    from c10.paths import ref_relpath

    deps = [str(Path(graph.root / rel)) for rel in graph.shipped_inputs()]
    for plan in graph.plans.values():
        deps += [plan.engine_rel, plan.sidecar_rel]
    return deps + [ref_relpath(rel) for rel in graph.owned_logicals()]


def manifest_settings(graph: Graph) -> dict:
    cfg = graph.config
    return {"request": cfg.request(), "key": str(cfg.signing.key), "tiles": len(graph.tiles)}


def write_manifest() -> dict:
    """Assemble every shipped file's entry, sign, and commit (envelope, then Manifest.json)."""
    from c10 import manifest as mf

    graph = _begin()
    files = _file_entries(graph)
    tiles_hash = mf.tiles_aggregate_hash(files)
    issued = now()
    # the anti-rollback state of verifiers is kept per cache id: carried over, or new for a new cache
    version, cache_id = mf.previous_identity(graph.root)
    body = mf.build_manifest(
        version=version, issued_at=issued,
        expires=issued + dt.timedelta(days=graph.config.signing.validity_days),
        build_identity=build_identity(graph, tiles_hash), request=graph.config.request(),
        host=host_info(graph), tools=tool_versions(), tiles_hash=tiles_hash, files=files,
        cache_id=cache_id or uuid.uuid4().hex, engines=_engine_entries(graph))
    data = mf.dumps_manifest(body)
    hash_cache().save()  # before the commit: after it, only the leftovers' removal may still fail
    try:
        mf.write_signed_manifest(graph.root, data, session.signing_key(lambda: load_key(graph)))
    finally:
        session.drop_key()
    _collect_garbage(graph, {f.path for f in files})
    return {"version": body["version"], "files": len(files), "expires": body["expires"]}


# A no-op build re-signs a Manifest that would expire within this margin (else it stays untouched).
RESIGN_MARGIN = dt.timedelta(days=1)


def manifest_fresh(task, values) -> bool:
    """doit uptodate: False when the last Manifest expires within RESIGN_MARGIN (frozen caches)."""
    expires = values.get("expires")
    if not expires:
        return False
    return dt.datetime.fromisoformat(expires.replace("Z", "+00:00")) - now() > RESIGN_MARGIN


def _collect_garbage(graph: Graph, listed: set[str]) -> None:
    """After the commit: the previous Manifest's shards and index files it no longer lists go
    (a failure here only leaves them for the next build's coverage gate: the commit stands)."""
    from c10.coverage import remove_dead

    try:
        remove_dead(graph.root, listed, set)
    except OSError as exc:
        print(f"warning: the new Manifest is committed, but its predecessor's files were not all "
              f"removed ({exc}); the next `doit build_cache` removes them")


def _file_entries(graph: Graph) -> list:
    from c10.manifest import FileEntry
    from c10.shards import tile_facts

    hashes = hash_cache()
    paths = {t.id: t.path for t in graph.tiles}
    entries = {}
    for plan in graph.embedding_plans():
        for rel in plan.shards:
            for tid, (size, digest) in tile_facts(_current(graph, rel)).items():
                entries[paths[tid]] = FileEntry(paths[tid], size, digest, "tile")
    for rel, kind in _derived_files(graph):
        digest, st = hashes.hash(rel)
        entries[rel] = FileEntry(rel, st.st_size, digest, kind)
    for logical, kind in _owned_files(graph):  # hashed when written, checked by refs_current
        entry = _ref_entry(graph, logical)
        entries[entry["path"]] = FileEntry(entry["path"], entry["size"], entry["blake3"], kind)
    return list(entries.values())


def _derived_files(graph: Graph) -> list[tuple[str, str]]:
    out = [(rel, "model") for rel in graph.shipped_inputs()]
    for plan in graph.plans.values():
        out += [(plan.engine_rel, "engine"), (plan.sidecar_rel, "engine-meta")]
    return out


def _owned_files(graph: Graph) -> list[tuple[str, str]]:
    """(logical path, kind) of every shard and index file."""
    out = []
    for plan in graph.plans.values():
        out += [(rel, "shard") for rel in plan.shards]
        out += [(rel, "index") for rel in (plan.index_rels if plan.shards else ())]
    return out


def _engine_entries(graph: Graph) -> list[dict]:
    return [{"path": p.engine_rel, "model": p.model.name, "backend": p.backend.name,
             "key": p.engine_key, "fingerprint": p.backend.host_fingerprint()}
            for p in graph.plans.values()]


def build_identity(graph: Graph, tiles_hash: str) -> str:
    """What the cache is a function of: the request, every engine key, every tile."""
    import hashlib
    import json

    data = {"request": graph.config.request(), "tiles": tiles_hash,
            "engines": {n: p.engine_key for n, p in sorted(graph.plans.items())}}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _begin() -> Graph:
    """Every writing action first checks the key (nothing written if it is refused), then locks."""
    graph = load_graph()
    collector_back_on()
    session.signing_key(lambda: load_key(graph))
    session.ensure_locked(graph.root)
    return graph


def load_key(graph: Graph):
    """Load and check the operator key before any file is written (seed CP-TC-7, CP-INV-7)."""
    from c10.manifest import check_key_allowed
    from c10.signing import load_signing_key

    signing = graph.config.signing
    if signing.key is None:
        raise SigningKeyError(f"{graph.root / 'c10.toml'}: `signing.key` is not set; create a key outside "
                              "the cache with `c10 keygen ~/.config/c10/operator.pem` and set its path")
    key = load_signing_key(signing.key, passphrase=_passphrase(signing), cache_root=graph.root)
    check_key_allowed(key, list(signing.allowed_keyids) or None)
    return key


def _passphrase(signing):
    """From signing.passphrase_file, $C10_KEY_PASSPHRASE_FILE, or a prompt on a terminal; never argv."""
    source = signing.passphrase_file or os.environ.get("C10_KEY_PASSPHRASE_FILE")
    if source:
        try:
            return Path(source).read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise SigningKeyError(f"{source}: cannot read the key passphrase file ({exc.strerror})") from None
    if sys.stdin.isatty():  # asked only if the key turns out to be encrypted
        return lambda: getpass.getpass(f"passphrase for {signing.key}: ").encode()
    return None


def host_info(graph: Graph) -> dict:
    plans = graph.plans.values()
    return {"os": platform.system(), "arch": platform.machine(), "python": platform.python_version(),
            "backends": {p.backend.name: p.backend.host_metadata() for p in plans}}


def tool_versions() -> dict:
    import doit

    return {"c10": __version__, "doit": ".".join(map(str, doit.__version__))}


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
