"""manifest: Manifest.json and its signed DSSE envelope, the build's single commit point."""
from __future__ import annotations

import datetime as dt
import platform
import sys
import uuid

from c10 import __version__
from c10.canonical import digest
from c10.errors import ManifestWriteError
from c10.plan import Plan
from c10.rules import session
from c10.rules.adapters import action, changed, plan_or_none, presigned
from c10.store.host import cache_secret
from c10.store.layout import COMMIT_MEMO, ENVELOPE_NAME, MANIFEST_NAME, ref_relpath

# A no-op build re-signs a Manifest that would expire within its margin (else it stays untouched):
# a tenth of the validity period, between these bounds (validity_days = 1: 2.4 hours).
RESIGN_MARGIN = (dt.timedelta(hours=1), dt.timedelta(days=1))
# What a re-sign changes: a Manifest that differs from the committed one only here is not rewritten.
RESIGNED_FIELDS = ("issued_at", "expires", "version")


def task_manifest():
    """Write Manifest.json and its signed DSSE envelope: the build's single commit point."""
    plan = plan_or_none()
    if plan is None:
        return {"actions": None}
    cfg = plan.config
    return {
        "file_dep": manifest_deps(plan),
        "targets": [MANIFEST_NAME, ENVELOPE_NAME],
        "task_dep": ["coverage"],
        "uptodate": [changed({"request": cfg.request(), "key": str(cfg.signing.key),
                              "tiles": len(plan.tiles)}),
                     manifest_fresh],
        "actions": [action(write_manifest)],
    }


def manifest_deps(plan: Plan) -> list[str]:
    """Every shipped file but the tiles (whose sizes and hashes the shards carry); shards and
    index files through the refs that name them."""
    deps = [str(plan.root / rel) for rel in plan.shipped_inputs()]
    for model_plan in plan.plans.values():
        deps += [model_plan.engine_rel, model_plan.sidecar_rel]
    return deps + [ref_relpath(rel) for rel in plan.owned_logicals()]


def resign_margin(validity_days: int) -> dt.timedelta:
    """How long before it expires a Manifest is re-signed: a tenth of its validity, bounded."""
    low, high = RESIGN_MARGIN
    return min(max(dt.timedelta(days=validity_days) / 10, low), high)


@presigned
def manifest_fresh(task, values) -> bool:
    """doit uptodate: False when Manifest.json is not the payload its envelope signs (edited, or a
    torn commit: CP-INV-1) or the last Manifest expires within its re-sign margin (frozen
    caches)."""
    from c10.trust.manifest import committed_intact

    build = session.current()
    intact = build.commit_intact  # decided by the coverage gate, which runs first
    if intact is None:  # `c10 status`: no gate ran (it reads the commit memo, never writes it)
        intact = committed_intact(build.root, cache_secret(build.root))
    expires = values.get("expires")
    if not intact or not expires:
        return False
    margin = resign_margin(build.plan().config.signing.validity_days)
    return dt.datetime.fromisoformat(expires.replace("Z", "+00:00")) - now() > margin


def write_manifest() -> dict:
    """Assemble every shipped file's entry, sign, and commit (envelope, then Manifest.json)."""
    from c10.trust import manifest as mf
    from c10.trust.keys import keyid, ssh_fingerprint
    from c10.trust.tilelists import tree_tiles_hash, write_lists_memo

    build = session.current()
    plan = build.begin_writing()
    key = build.operator_key()
    files, lists_memo, fresh_keys = _file_entries(build, plan)
    request = plan.config.signed_request()
    request["signing"] |= {"keyid": keyid(key), "fingerprint": ssh_fingerprint(key)}
    tiles_hash = tree_tiles_hash(files)
    issued = now()
    # the anti-rollback state of verifiers is kept per cache id: carried over, or new for a new
    # cache
    version, cache_id = mf.previous_identity(plan.root)
    body = mf.build_manifest(
        version=version, issued_at=issued,
        expires=issued + dt.timedelta(days=plan.config.signing.validity_days),
        build_identity=build_identity(plan, tiles_hash), host=host_info(plan), request=request,
        tools=tool_versions(), tiles_hash=tiles_hash, files=files,
        cache_id=cache_id or uuid.uuid4().hex, engines=_engine_entries(plan),
        runtime=runtime_spec(plan))
    committed = _same_content(build.provenance.verified, body,
                              issued + resign_margin(plan.config.signing.validity_days))
    if committed is not None:  # the doit DB was lost, the cache moved: nothing to sign (CP-INV-1)
        build.drop_key()
        write_lists_memo(plan.root, lists_memo)
        _save_list_keys(build, files, fresh_keys)
        _collect_garbage(plan, {f.path for f in files})
        return {"version": committed["version"], "files": len(files),
                "expires": committed["expires"], "unchanged": True}
    data = mf.dumps_manifest(body)
    build.hashes.save()  # before the commit: after it, only the leftovers' removal may still fail
    # a hint naming lists the next root may not sign: then they are only rebuilt, never trusted
    write_lists_memo(plan.root, lists_memo)
    try:
        mf.write_signed_manifest(plan.root, data, key)
    finally:
        build.drop_key()
    remember_commit(plan.root)
    _save_list_keys(build, files, fresh_keys)
    _collect_garbage(plan, {f.path for f in files})
    return {"version": body["version"], "files": len(files), "expires": body["expires"]}


def remember_commit(root) -> None:
    """Record the Manifest pair as intact (c10.trust.manifest.record_intact): a failure is only
    reported, the commit stands and the next build reads the pair once more."""
    from c10.trust.manifest import record_intact

    problem = record_intact(root, cache_secret(root, create=True))
    if problem:
        # stderr: doit shows it even for a task whose stdout it keeps (verbosity 1)
        print(f"warning: {COMMIT_MEMO} not written ({problem}); the next build re-reads the "
              "Manifest pair", file=sys.stderr)


def _same_content(committed: dict | None, body: dict, fresh_until: dt.datetime) -> dict | None:
    """The committed, verified Manifest if `body` would differ from it only in RESIGNED_FIELDS and
    it stays valid past `fresh_until`; None when a new version must be signed."""
    from c10.canonical import canonical_json
    from c10.trust.manifest import parse_time

    if committed is None or parse_time(committed["expires"]) <= fresh_until:
        return None
    if (committed.get("build_identity"), committed.get("tiles_hash")) != (body["build_identity"],
                                                                       body["tiles_hash"]):
        return None

    def content(manifest: dict) -> bytes:
        return canonical_json({k: v for k, v in manifest.items() if k not in RESIGNED_FIELDS})

    return committed if content(committed) == content(body) else None


def _collect_garbage(plan: Plan, listed: set[str]) -> None:
    """After the commit: the previous Manifest's shards and index files it no longer lists go
    (a failure here only leaves them for the next build's coverage gate: the commit stands)."""
    from c10.store.orphans import dead_files, remove_dead

    try:
        remove_dead(plan.root, dead_files(plan.root, listed))
    except OSError as exc:
        print(f"warning: the new Manifest is committed, but its predecessor's files were not all "
              f"removed ({exc}); the next `doit build_cache` removes them", file=sys.stderr)


def _file_entries(build, plan: Plan) -> tuple[list, dict[str, list[str]], dict]:
    """Every entry of the root: shards, index files, models, engines, and one tile list per block;
    the tile-list memo to keep once committed, and the keys of the lists written now. Derived
    files are listed only with bytes this build wrote or the last signed Manifest lists
    (c10.trust.provenance): refs, the hash cache and doit's DB decide what is rebuilt, never what
    is signed."""
    from c10.trust.manifest import FileEntry

    entries, by_block = {}, _tile_shards(plan)
    in_blocks = {logical for shards in by_block.values() for logical, _ in shards}
    for logical, kind in _owned_files(plan):
        if logical not in in_blocks:
            entry, _ = build.provenance.current(logical)
            entries[entry["path"]] = FileEntry(entry["path"], entry["size"], entry["blake3"], kind)
    memo: dict[str, list[str]] = {}
    fresh: dict = {}
    for entry in _tile_lists(build, plan, by_block, entries, memo, fresh):
        entries[entry.path] = entry
    for rel, kind in _derived_files(plan):
        entries[rel] = _hashed_entry(build, plan, rel, kind)
    return list(entries.values()), memo, fresh


def _tile_shards(plan: Plan) -> dict[tuple[int, int, int], list[tuple[str, list]]]:
    """Block -> (logical path, tiles) of its shards, whose rows carry the block's tiles' sizes and
    hashes."""
    from c10.store.layout import shard_block

    out: dict[tuple[int, int, int], list[tuple[str, list]]] = {}
    for model_plan in plan.embedding_plans():
        for logical, tiles in model_plan.shards.items():
            out.setdefault(shard_block(logical), []).append((logical, tiles))
    return dict(sorted(out.items()))


def _tile_lists(build, plan: Plan, by_block: dict, entries: dict, memo: dict, fresh: dict):
    """Each block's tile list, its shard entries going into `entries`, its memo row into `memo`
    and, when written now, its tiles' keys into `fresh` (c10.store.listkeys): the last
    Manifest's list when the block is unchanged (_reused_list), else built from its shards' tile
    rows, one block in memory at a time, written before the commit (the root never names a list
    that is not there) and only when no file holds its bytes yet
    (c10.trust.tilelists.write_tile_list)."""
    import io

    from c10.features.shards import tile_facts
    from c10.store.listkeys import digest_keys
    from c10.trust.manifest import FileEntry
    from c10.trust.tilelists import LIST_KIND, block_name, read_lists_memo, write_tile_list

    previous = _previous_root(build)
    known = read_lists_memo(plan.root) if previous else {}
    for block, shards in by_block.items():
        name, key = block_name(block), plan.block_key(block)
        listed = _reused_list(build, plan, previous, known.get(name), key, block, shards)
        if listed is not None:
            entries.update((e.path, e) for e in listed[1:])
            memo[name] = [key, listed[0].path]
            yield listed[0]
            continue
        facts: dict = {}
        for logical, _ in shards:
            entry, data = build.provenance.current(logical)
            entries[entry["path"]] = FileEntry(entry["path"], entry["size"], entry["blake3"],
                                               "shard")
            facts.update(tile_facts(io.BytesIO(data)))
        paths = {t.id: t.path for t in shards[0][1]}
        rel, size, digest = write_tile_list(plan.root, block, (
            (paths[tid], size, digest) for tid, (size, digest) in facts.items()))
        memo[name] = [key, rel]
        fresh[digest] = digest_keys([d for _, d in facts.values()])
        yield FileEntry(rel, size, digest, LIST_KIND)


def _save_list_keys(build, files: list, fresh: dict) -> None:
    """LIST_KEYS for the committed root: the lists written now, the others as this build's hint
    took them or the last commit kept them (a list known to neither is read by the next hint)."""
    from c10.store.listkeys import read_list_keys, write_list_keys
    from c10.trust.tilelists import LIST_KIND

    lists = [f.blake3 for f in files if f.kind == LIST_KIND]
    known = build.provenance.list_keys or read_list_keys(build.root)
    if not fresh and set(known) == set(lists):
        return  # the file already holds exactly these lists
    kept = {d: k for d in lists if (k := fresh.get(d, known.get(d))) is not None}
    try:
        write_list_keys(build.root, kept)
    except OSError as exc:  # a hint: the commit stands, the next build reads the lists
        print(f"warning: tile-list keys not saved ({exc}); the commit stands, the next build "
              "reads the tile lists instead", file=sys.stderr)


def _previous_root(build) -> dict[str, dict]:
    """path -> entry of the last verified Manifest's root (its tile lists unread), {} if none."""
    manifest = build.provenance.verified
    return {f["path"]: f for f in manifest["files"]} if manifest else {}


def _reused_list(build, plan: Plan, previous: dict, known: list[str] | None, key: str,
                 block: tuple[int, int, int], shards: list) -> list | None:
    """[list entry, shard entries...] of the last Manifest for a block whose tiles' content key is
    the one the memo recorded with that list, whose shards are the signed ones (hash cache) and
    whose list file still holds its signed bytes; None: rebuild the list."""
    from c10.errors import VerifyError
    from c10.store.refs import read_ref
    from c10.trust.files import read_listed
    from c10.trust.manifest import FileEntry
    from c10.trust.tilelists import LIST_KIND, list_block

    listed = previous.get(known[1]) if known and known[0] == key else None
    if listed is None or listed["kind"] != LIST_KIND or list_block(listed["path"]) != block:
        return None
    out = [FileEntry(listed["path"], listed["size"], listed["blake3"], LIST_KIND)]
    for logical, _ in shards:
        ref = read_ref(plan.root, logical)
        signed = previous.get(ref["path"]) if ref else None
        if signed is None or signed["kind"] != "shard" or signed["blake3"] != ref["blake3"]:
            return None
        try:
            if build.hashes.hash(signed["path"])[0] != signed["blake3"]:
                return None
        except OSError:
            return None
        out.append(FileEntry(signed["path"], signed["size"], signed["blake3"], "shard"))
    try:  # its bytes, read once and hashed: content decides, never the memo
        read_listed(plan.root, listed)
    except VerifyError:
        return None
    return out


def _hashed_entry(build, plan: Plan, rel: str, kind: str):
    """A model or engine file's entry from its bytes, hashed now; an engine or sidecar neither
    compiled by this build nor signed before is refused (its sidecar goes: the engine rebuilds)."""
    from c10.store.digest import blake3_file
    from c10.trust.manifest import FileEntry

    size, digest = (plan.root / rel).stat().st_size, blake3_file(plan.root / rel)
    if kind in ("engine", "engine-meta") and not build.provenance.trusts(rel, digest):
        build.provenance.queue_untrusted()
        raise ManifestWriteError(build.provenance.untrusted(rel))
    return FileEntry(rel, size, digest, kind)


def _derived_files(plan: Plan) -> list[tuple[str, str]]:
    out = [(rel, "model") for rel in plan.shipped_inputs()]
    for model_plan in plan.plans.values():
        out += [(model_plan.engine_rel, "engine"), (model_plan.sidecar_rel, "engine-meta")]
    return out


def _owned_files(plan: Plan) -> list[tuple[str, str]]:
    """(logical path, kind) of every shard and index file."""
    out = []
    for model_plan in plan.plans.values():
        out += [(rel, "shard") for rel in [*model_plan.shards, *model_plan.windows]]
        out += [(rel, "index") for rel in [*model_plan.index_rels, *model_plan.trained]]
    return out


def _engine_entries(plan: Plan) -> list[dict]:
    return [{"path": p.engine_rel, "model": p.model.name, "backend": p.backend.name,
             "key": p.engine_key, "fingerprint": p.backend.host_fingerprint()}
            for p in plan.plans.values()]


def runtime_spec(plan: Plan) -> dict:
    """What the aircraft needs to use the cache, signed (c10.trust.runtime reads it): per model
    its role, engine, key, preprocessing and batch; the index and its search settings; the area."""
    area, index = plan.config.area, plan.config.index
    return {"area": {"name": area.name, "bbox": list(area.bbox), "zooms": list(area.zooms),
                     "sector_class": area.sector_class},
            "tiles": {"scheme": "xyz", "block": plan.config.shards.block},
            "models": {name: _runtime_model(plan, mp, index) for name, mp in plan.plans.items()}}


def _runtime_model(plan: Plan, mp, index) -> dict:
    from c10.store.refs import current_entry

    model = mp.model
    out = {"role": model.role, "engine": mp.engine_rel, "sidecar": mp.sidecar_rel,
           "backend": mp.backend.name, "key": mp.engine_key, "precision": model.precision,
           "batch_size": model.batch_size, "onnx": plan.inside(model.path),
           "preprocessing": model.preprocessing()}
    if model.role == "global" and mp.index_rels:
        index_rel, ids_rel = (current_entry(plan.root, rel)["path"] for rel in mp.index_rels)
        out["index"] = {"index": index_rel, "ids": ids_rel, "factory": index.factory,
                        "metric": index.metric, "ef_search": index.ef_search,
                        "ef_construction": index.ef_construction,
                        # the id map counts in 1/div tile (shards.stride = 1/div; 1: tile ids)
                        "div": plan.config.shards.div}
    if model.role == "local":
        out["shards"] = {rel: current_entry(plan.root, rel)["path"] for rel in mp.shards}
    return out


def build_identity(plan: Plan, tiles_hash: str) -> str:
    """What the cache is a function of: the request, every engine key, every tile."""
    return digest({"request": plan.config.signed_request(), "tiles": tiles_hash,
                   "engines": {n: p.engine_key for n, p in sorted(plan.plans.items())}})


def host_info(plan: Plan) -> dict:
    return {"os": platform.system(), "arch": platform.machine(),
            "python": platform.python_version(),
            "backends": {p.backend.name: p.backend.host_metadata() for p in plan.plans.values()}}


def tool_versions() -> dict:
    import doit

    return {"c10": __version__, "doit": ".".join(map(str, doit.__version__))}


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
