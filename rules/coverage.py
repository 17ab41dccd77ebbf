"""coverage: remove dead graph-owned files, fail on any file no task declares (D-C10-3)."""
from __future__ import annotations

from functools import cache

from c10.errors import ManifestCoverageError, MissingTilesError
from c10.plan import Plan
from c10.rules import session
from c10.rules.adapters import action, plan_or_none
from c10.store.layout import ENGINES_DIR, TILES_DIR
from c10.store.orphans import Verdict


def task_coverage():
    """Gate: fail if any file under the cache is declared by no task (always runs)."""
    if plan_or_none() is None:
        return {"actions": None}
    return {"actions": [action(check_coverage)], "task_dep": ["engines", "shards", "index"],
            "verbosity": 2}


def verdict(plan: Plan) -> Verdict:
    """What the gate removes and what it refuses, deciding nothing twice: the one verdict of the
    gate and of `c10 status`."""
    from c10.store.orphans import verdict as decide
    from c10.store.refs import committed_files, read_ref

    entries = (read_ref(plan.root, rel) for rel in plan.owned_logicals())
    live = {e["path"] for e in entries if e}
    # shards/ and index/ keep the build's current files and, until the next commit, the last
    # Manifest's; tiles/ was listed file by file when the plan loaded: its orphans are known (the
    # files not named z/x/y; a tile outside the request is an input held, never an orphan: CP-TC-3)
    return decide(plan.root, plan.declared(tiles=False), live,
                  cache(lambda: set(committed_files(plan.root))), TILES_DIR, plan.strays)


def check_coverage() -> None:
    """Remove dead graph-owned files, then fail on any undeclared file."""
    from c10.store.orphans import remove_dead
    from c10.store.refs import remove_stale_refs

    build = session.current()
    plan = build.plan()
    build.resume_gc()
    build.ensure_locked()
    _roll_forward(build)
    if not plan.tiles:
        area = plan.config.area
        raise MissingTilesError(f"{plan.root}: no tiles in scope (bbox {list(area.bbox)}, zooms "
                                f"{list(area.zooms)})",
                                fix="fetch tiles into tiles/{z}/{x}/{y}.jpg first "
                                f"(or `c10 import {plan.root} SOURCE`)")
    found = verdict(plan)
    if found.orphans:
        raise ManifestCoverageError(_orphan_message(plan, found.orphans))
    removed = remove_dead(plan.root, found.dead) + remove_stale_refs(plan.root,
                                                                     set(plan.owned_logicals()))
    for rel in removed:
        print(f"removed dead {rel}")
    # hashes the checker computed this run (a mass `touch`): saved once, never computed again; the
    # entries of files the cache no longer has are dropped
    build.hashes.retain(_hashed_files(plan))
    build.hashes.save()
    build.save_provenance(prune=True)  # (a no-op build has none: it never loads the key)
    build.save_scan_memo()
    _check_complete(plan)


def _hashed_files(plan: Plan):
    """keep(bucket) for HashCache.retain: every path the hash cache should still know. A column's
    are the tiles the scan found in it (in scope or not: hashed again when re-widened); "other"
    holds declared files, refs and their files, models (a committed file no ref names is dropped:
    nothing hashes it again)."""
    from c10.store.layout import TILES_DIR, ref_relpath
    from c10.store.refs import read_ref

    @cache
    def other() -> set[str]:
        keep = plan.declared(tiles=False)
        for logical in plan.owned_logicals():
            keep.add(ref_relpath(logical))
            entry = read_ref(plan.root, logical)
            if entry:
                keep.add(entry["path"])
        for model_plan in plan.plans.values():
            keep.add(str(model_plan.model.path.resolve()))
            if model_plan.spec.calibration_path is not None:
                keep.add(str(model_plan.spec.calibration_path.resolve()))
        return keep

    def keep(bucket: str) -> set[str]:
        if bucket == "other":
            return other()
        return {t.path for t in plan.scan.columns.get(f"{TILES_DIR}/{bucket}", ())}

    return keep


def _check_complete(plan: Plan) -> None:
    """area.require_complete: the Manifest is signed only over the whole requested area."""
    counts = plan.tile_counts()
    if plan.config.area.require_complete and counts.missing:
        raise MissingTilesError(
            f"{plan.root}: {counts.missing} of {counts.expected} tiles of area.bbox/zooms are "
            "missing and area.require_complete = true; the previous Manifest stays in force",
            fix=f"fetch them (or `c10 import {plan.root} SOURCE`), see which with "
                f"`c10 map {plan.root} -o map.png`")


def _roll_forward(build) -> None:
    """A build killed between the Manifest's two renames left a torn commit: complete it first.
    Then record whether Manifest.json is the signed payload (build.commit_intact): if not (torn
    beyond repair, edited, re-formatted), the manifest task re-signs it (CP-INV-1)."""
    from c10.rules.manifest import remember_commit
    from c10.store.host import cache_secret
    from c10.trust.manifest import committed_intact, remembered_intact, roll_forward

    # on a no-op build: a stat of the pair (the commit recorded it), else its one read
    remembered = remembered_intact(build.root, cache_secret(build.root))
    intact = remembered or committed_intact(build.root)
    version = None if intact else roll_forward(build.root)
    if version is not None:
        print(f"warning: a build was cut between writing Manifest.json.dsse and Manifest.json; "
              f"rolled Manifest.json forward to the signed version {version}")
    build.commit_intact = intact or version is not None or committed_intact(build.root)
    if build.commit_intact and not remembered:
        remember_commit(build.root)


def _orphan_message(plan: Plan, orphans: list[str]) -> str:
    shown = ", ".join(orphans[:5]) + (f" and {len(orphans) - 5} more" if len(orphans) > 5 else "")
    hints = []
    if any(o.startswith(ENGINES_DIR + "/") for o in orphans):
        hints.append("`doit prune` lists stale engines and `doit prune --apply` removes them")
    if any(o.startswith(TILES_DIR + "/") for o in orphans):
        hints.append("files in tiles/ not named tiles/{z}/{x}/{y}.{jpg,png,webp} (with x and y "
                     "within the zoom) must be moved out of the cache")
    hints.append("move any other file out of the cache")
    return (f"{len(orphans)} file(s) under {plan.root} are declared by no task: {shown}; "
            + "; ".join(hints) + "; the previous Manifest stays in force")
