"""doit's console reporter plus c10's BuildReport: counts, stage times, a summary table."""
from __future__ import annotations

import datetime as dt
import time

from doit.reporter import ConsoleReporter

from c10.errors import C10Error
from c10.report import STAGES, BuildOutcome, BuildReport, manifest_facts, summary, write_report
from c10.rules import session

# Stages whose running means the cache changed (coverage always runs, build_cache is a group).
WORK_STAGES = ("engines", "shards", "index", "manifest")


class C10Reporter(ConsoleReporter):
    """Prints what doit prints, and after a `build_cache` run writes and prints the BuildReport."""

    desc = "console output, then c10's build report"

    def __init__(self, outstream, options):
        super().__init__(outstream, options)
        self._report_run = False
        self._started: dict[str, float] = {}
        self._stages = {s: {"ran": 0, "up_to_date": 0, "failed": 0, "seconds": 0.0} for s in STAGES}
        self._values: list[tuple[str, dict]] = []  # (task, its values)
        self._fail_msg: str | None = None

    def initialize(self, tasks, selected_tasks):
        self._report_run = "build_cache" in (selected_tasks or ())
        self._stages["load"]["seconds"] = session.current().elapsed()

    def execute_task(self, task):
        super().execute_task(task)
        self._started[task.name] = time.perf_counter()

    def skip_uptodate(self, task):
        super().skip_uptodate(task)
        if task.actions and _stage(task.name) in self._stages:
            self._stages[_stage(task.name)]["up_to_date"] += 1

    def add_success(self, task):
        super().add_success(task)
        if self._count(task, "ran"):
            self._values.append((task.name, dict(task.values or {})))

    def add_failure(self, task, fail):
        super().add_failure(task, fail)
        self._count(task, "failed")
        if self._fail_msg is None:
            self._fail_msg = _last_line(fail.get_msg())

    def runtime_error(self, msg):
        super().runtime_error(msg)
        self._fail_msg = self._fail_msg or _last_line(msg)

    def _count(self, task, what: str) -> bool:
        stage = self._stages.get(_stage(task.name))
        start = self._started.pop(task.name, None)
        if stage is None or not task.actions:
            return False
        stage[what] += 1
        stage["seconds"] += 0.0 if start is None else time.perf_counter() - start
        return True

    def complete_run(self):
        super().complete_run()
        if not self._report_run:
            return
        build = session.current()
        report = self.build_report()
        build.report = report
        self.write(summary(report) + "\n")
        try:
            build.ensure_locked()  # never write over a running build's report
            write_report(report.cache_root, report)
        except (C10Error, OSError) as exc:
            self.write(f"  report not written: {exc}\n")

    def build_report(self) -> BuildReport:
        build = session.current()
        error = build.error
        failed = self._fail_msg is not None or error is not None
        values = dict(_sum_values(self._values))
        try:
            plan = build.plan()
            tiles = _tile_counts(plan)
        except C10Error:
            plan, tiles = None, {}
        if failed:
            outcome = BuildOutcome.FAILURE
        elif any(self._stages[s]["ran"] for s in WORK_STAGES) and not _nothing_new(self._values):
            outcome = BuildOutcome.SUCCESS
        else:
            outcome = BuildOutcome.IDEMPOTENT_NO_OP
        return BuildReport(
            outcome=outcome, engines_built=values["engines_built"],
            engines_reused=values["engines_reused"],
            descriptors_generated=values["embedded"],
            failure_reason=str(error) if error else self._fail_msg,
            elapsed_s=round(build.elapsed(), 3), shards_generated=self._stages["shards"]["ran"],
            descriptors_reused=values["reused"],
            local_features_generated=values["extracted"],
            local_features_reused=values["local_reused"], **manifest_facts(build.root), **tiles,
            error_type=type(error).__name__ if error else None,
            stages={s: {**v, "seconds": round(v["seconds"], 3)} for s, v in self._stages.items()},
            rebuilt_tiles=tuple(sorted(_rebuilt(plan, self._values))) if plan else (),
            cache_root=build.root,
            finished_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))


def _nothing_new(values: list[tuple[str, dict]]) -> bool:
    """Tasks ran (a lost doit DB, a moved cache: doit re-decides) but decided by content that the
    cache is what its Manifest signs: no engine compiled, no tile embedded or extracted, and the
    manifest task left the committed Manifest untouched (CP-INV-1)."""
    stages = {_stage(name): vals for name, vals in values}
    if not stages.get("manifest", {}).get("unchanged"):
        return False
    return not any(vals.get("built") or vals.get("embedded") or vals.get("extracted")
                   for name, vals in values if _stage(name) in ("engines", "shards"))


def _stage(task_name: str) -> str:
    return task_name.split(":", 1)[0]


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "unknown error"


def _sum_values(values: list[tuple[str, dict]]):
    totals = {"engines_built": 0, "engines_reused": 0, "embedded": 0, "reused": 0,
              "extracted": 0, "local_reused": 0}
    for name, vals in values:
        if _stage(name) == "engines" and "built" in vals:
            totals["engines_built" if vals["built"] else "engines_reused"] += 1
        elif _stage(name) == "shards" and "extracted" in vals:  # a local-feature shard
            totals["extracted"] += int(vals["extracted"])
            totals["local_reused"] += int(vals.get("reused", 0))
        elif _stage(name) == "shards":
            totals["embedded"] += int(vals.get("embedded", 0))
            totals["reused"] += int(vals.get("reused", 0))
    return totals.items()


def _tile_counts(plan) -> dict:
    counts = plan.tile_counts()
    return {"tiles_expected": counts.expected, "tiles_present": counts.present,
            "tiles_missing": counts.missing, "tiles_out_of_scope": counts.out_of_scope,
            "require_complete": plan.config.area.require_complete}


def _rebuilt(plan, values: list[tuple[str, dict]]) -> set[tuple[int, int, int]]:
    """(z, x, y) of every tile embedded in this run.

    A shard embeds all its tiles, or (same embedding identity) exactly the tiles it lacks with
    their bytes, which it names (its values' "fresh").
    """
    out: set[tuple[int, int, int]] = set()
    for name, vals in values:
        embedded = int(vals.get("embedded", 0)) if _stage(name) == "shards" else 0
        if not embedded:
            continue
        rel = f"shards/{name.split(':', 1)[1]}.npy"
        tiles = [t for mp in plan.embedding_plans() for t in mp.shards.get(rel, ())]
        if "fresh" in vals:
            fresh = set(vals["fresh"])
            tiles = [t for t in tiles if t.path in fresh]
        out.update((t.z, t.x, t.y) for t in tiles)
    return out
