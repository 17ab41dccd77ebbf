"""`c10 status DIR`: what a build would redo and why, in words, from doit's own status reasons."""
from __future__ import annotations

from pathlib import Path

# What each family's `uptodate` callables stand for when they say "not up to date".
SETTINGS = {
    "engines": ("engine identity key changed (ONNX bytes, backend or its version, host, "
                "precision, workspace)"),
    "shards": "embedding identity changed (engine key or preprocessing)",
    "index": "index parameters changed (factory, metric, efConstruction, efSearch)",
    "manifest": "request, signing key or tile count changed",
}
CALLABLES = {"manifest_fresh": ("the Manifest expires soon (within a tenth of "
                               "signing.validity_days, at most a day) or Manifest.json is not the "
                               "payload its envelope signs: it is re-signed"),
             "tiles_current": ("its tiles changed: one added, removed, renamed or replaced in a "
                               "column whose directory changed (a tile rewritten in place is seen "
                               "only by `c10 status --full` or C10_FULL_STAT=1)"),
             "refs_current": ("its file is missing or damaged, or a stopped build left another "
                              "one current")}
SHOWN = 3


def plan(status: dict) -> list[dict]:
    """Each task as {name, run: bool, why: [str], error: bool}, with reruns caused by rebuilt
    inputs."""
    root = Path(status["root"])
    rebuilt: dict[str, str] = {}  # absolute path -> task that rewrites it
    out = []
    for task in status["tasks"]:
        why = explain(task, root)
        error = task["status"] == "error"
        if task["status"] == "up-to-date":
            inputs = [(d, rebuilt[_abs(root, d)]) for d in task["file_dep"]
                      if _abs(root, d) in rebuilt]
            if inputs:
                why = [f"input rebuilt first by {inputs[0][1]}: {_rel(root, inputs[0][0])}"
                       + (f" and {len(inputs) - 1} more" if len(inputs) > 1 else "")]
        run = bool(why)
        if run:
            rebuilt.update({_abs(root, t): task["name"] for t in task["targets"]})
        out.append({"name": task["name"], "run": run, "why": why, "error": error})
    return out


def explain(task: dict, root: Path) -> list[str]:
    """doit's reasons for one task in the operator's words ([] when up to date)."""
    if task["status"] == "up-to-date":
        return []
    reasons, family = task["reasons"], task["name"].split(":", 1)[0]
    if reasons.get("has_no_dependencies"):
        return ["always runs (the coverage gate checks every file under the cache)"
                if family == "coverage" else "always runs (no dependencies)"]
    if not task["recorded"]:
        return ["no successful run recorded (never built, or its last run failed)"]
    why = []
    added = set(reasons.get("added_file_dep", ()))
    if added:  # doit also lists an added file as changed: say it once
        reasons = {**reasons, "changed_file_dep": [p for p in reasons.get("changed_file_dep", ())
                                                   if p not in added]}
    for label, key in (("missing", "missing_target"), ("added", "added_file_dep"),
                       ("removed", "removed_file_dep"), ("changed", "changed_file_dep"),
                       ("MISSING INPUT (the build fails)", "missing_file_dep")):
        if reasons.get(key):
            why.append(f"{label}: {_paths(root, reasons[key])}")
    listed = reasons.get("added_file_dep") or reasons.get("removed_file_dep")
    for name in reasons.get("uptodate_false", []):
        if name == "config_changed":
            # a shard's key holds its tile list: said already
            if not (family == "shards" and listed):
                why.append(SETTINGS.get(family, "settings changed"))
        else:
            why.append(CALLABLES.get(name, f"{name} says it is not up to date"))
    if reasons.get("checker_changed"):
        why.append("the file checker changed: every input is checked again")
    return why or ["not up to date"]


def _paths(root: Path, paths: list[str]) -> str:
    shown = ", ".join(_rel(root, p) for p in paths[:SHOWN])
    return shown + (f" and {len(paths) - SHOWN} more" if len(paths) > SHOWN else "")


def _abs(root: Path, path: str) -> str:
    return str(root / path) if not Path(path).is_absolute() else path


def _rel(root: Path, path: str) -> str:
    try:
        return Path(path).relative_to(root).as_posix() if Path(path).is_absolute() else path
    except ValueError:
        return path


def render(status: dict) -> str:
    """The operator's page: tasks that would run with why, the area, the coverage gate's verdict."""
    steps = plan(status)
    todo = [s for s in steps if s["run"]]
    work = [s for s in todo if not s["name"].startswith("coverage")]
    head = (f"c10 status {status['root']}: "
            + (f"a build would redo {len(work)} task(s)" if work
               else "up to date: a build changes nothing")
            + f"; {len(steps) - len(todo)} up to date")
    lines = [head]
    width = max((len(s["name"]) for s in todo), default=0)
    for step in todo:
        lines.append(f"  {step['name']:<{width}}  {'; '.join(step['why'])}")
    lines.append(f"tiles: {status['tiles_present']} present, {status['tiles_missing']} missing of "
                 f"{status['tiles_expected']} in bbox {status['bbox']} zooms {status['zooms']}"
                 + (" (area.require_complete: the build fails)" if status["tiles_missing"]
                    and status["require_complete"] else ""))
    if status.get("tiles_out_of_scope"):
        lines.append(f"tiles out of scope: {status['tiles_out_of_scope']} in tiles/ outside the "
                     "bbox/zooms, kept as inputs: never indexed nor signed (not in the flight "
                     "image)")
    lines += _gate(status)
    return "\n".join(lines)


def _gate(status: dict) -> list[str]:
    lines = []
    if status["dead"]:
        lines.append(f"the build removes {len(status['dead'])} dead file(s): "
                     f"{_paths(Path('.'), status['dead'])}")
    if status["orphans"]:
        lines.append(f"the coverage gate would FAIL: {len(status['orphans'])} undeclared file(s): "
                     f"{_paths(Path('.'), status['orphans'])}")
    if status["tiles_present"] == 0:
        lines.append("the build would FAIL: no tiles in scope; "
                     f"`c10 import {status['root']} SOURCE` first")
    return lines


def would_change(status: dict) -> bool:
    """True when a build would do more than run the coverage gate."""
    return any(s["run"] and not s["name"].startswith("coverage") for s in plan(status))
