"""The BuildReport of every build: the seed's DTO, .c10/report.json, the summary table."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from c10.store import atomic
from c10.store.layout import MANIFEST_NAME, REPORT_PATH

REPORT_SCHEMA = 1
STAGES = ("load", "engines", "shards", "index", "coverage", "manifest")


class BuildOutcome(Enum):
    SUCCESS = "success"
    FAILURE = "failure"
    IDEMPOTENT_NO_OP = "idempotent_no_op"


@dataclass(frozen=True)
class BuildReport:
    """The seed's fields first (contract v1.0.0), then c10's additive ones (all defaulted)."""

    outcome: BuildOutcome
    engines_built: int
    engines_reused: int
    descriptors_generated: int
    manifest_hash: str | None     # sha256 hex of the Manifest.json in force after the run
    manifest_path: Path | None
    failure_reason: str | None
    elapsed_s: float
    shards_generated: int = 0
    descriptors_reused: int = 0   # rows carried over inside re-written shards
    manifest_version: int | None = None
    build_identity: str | None = None
    tiles_expected: int | None = None
    tiles_present: int | None = None
    tiles_missing: int | None = None
    # tiles in tiles/ outside area.bbox/zooms: inputs kept for another request, never indexed or
    # listed in the Manifest (CP-TC-3)
    tiles_out_of_scope: int | None = None
    require_complete: bool = False
    error_type: str | None = None
    # stage -> ran, up_to_date, failed, seconds
    stages: dict[str, dict] = field(default_factory=dict)
    rebuilt_tiles: tuple[tuple[int, int, int], ...] = ()   # (z, x, y) embedded in this run
    cache_root: Path | None = None
    finished_at: str | None = None
    # tiles whose local features (role = "local") were extracted in this run, and rows carried
    # over inside re-written local-feature shards
    local_features_generated: int = 0
    local_features_reused: int = 0

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["outcome"] = self.outcome.value
        for key in ("manifest_path", "cache_root"):
            data[key] = None if data[key] is None else str(data[key])
        data["rebuilt_tiles"] = [list(t) for t in self.rebuilt_tiles]
        return {"schema": REPORT_SCHEMA, **data}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "BuildReport":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["outcome"] = _outcome(values.get("outcome"))
        for key in ("manifest_path", "cache_root"):
            values[key] = None if values.get(key) is None else Path(values[key])
        values["rebuilt_tiles"] = tuple(tuple(t) for t in values.get("rebuilt_tiles", ()))
        return cls(**values)


def _outcome(value: Any) -> BuildOutcome:
    """Seed versioning: an unknown outcome is treated as FAILURE."""
    try:
        return BuildOutcome(value)
    except ValueError:
        return BuildOutcome.FAILURE


def manifest_facts(root: Path) -> dict[str, Any]:
    """Path, sha256, version and build identity of the Manifest in force (all None if there is
    none)."""
    path = Path(root) / MANIFEST_NAME
    try:
        data = path.read_bytes()
    except OSError:
        return {"manifest_path": None, "manifest_hash": None, "manifest_version": None,
                "build_identity": None}
    version, identity = _head_and_tail(data)
    return {"manifest_path": path, "manifest_hash": hashlib.sha256(data).hexdigest(),
            "manifest_version": version, "build_identity": identity}


# The Manifest is canonical JSON (sorted keys): build_identity opens it and version closes it.
_HEAD = re.compile(rb'\A\{"build_identity":"([0-9a-f]{64})"')
_TAIL = re.compile(rb'"version":(\d+)\}\s*\Z')


def _head_and_tail(data: bytes) -> tuple[int | None, str | None]:
    """Two fields without parsing a large Manifest on every no-op build; a full parse if the layout
    differs."""
    head, tail = _HEAD.match(data), _TAIL.search(data[-64:])
    if head and tail:
        return int(tail.group(1)), head.group(1).decode()
    try:
        body = json.loads(data)
    except ValueError:
        return None, None
    return (body.get("version"), body.get("build_identity")) if isinstance(body, dict) else (None,
                                                                                             None)


def write_report(root: Path, report: BuildReport) -> Path:
    """Atomically replace .c10/report.json."""
    path = Path(root) / REPORT_PATH
    atomic.write_text(path, json.dumps(report.to_json(), indent=1, sort_keys=True) + "\n")
    return path


def read_report(root: Path) -> BuildReport | None:
    """The last build's report, or None if there is none (or it cannot be read)."""
    try:
        return BuildReport.from_json(json.loads((Path(root) / REPORT_PATH).read_bytes()))
    except (OSError, ValueError, TypeError):
        return None


def summary(report: BuildReport) -> str:
    """A short table for the end of a build."""
    head = {BuildOutcome.SUCCESS: "SUCCESS", BuildOutcome.FAILURE: "FAILURE",
            BuildOutcome.IDEMPOTENT_NO_OP: "IDEMPOTENT_NO_OP (nothing changed, Manifest untouched)"}
    lines = [f"c10 build report: {head[report.outcome]} in {report.elapsed_s:.2f} s "
             f"({REPORT_PATH})",
             f"  {'stage':<9} {'ran':>5} {'current':>7} {'time':>9}"]
    for stage in STAGES:
        st = report.stages.get(stage)
        if st is not None:
            ran = "" if stage == "load" else st.get("ran", 0) + st.get("failed", 0)
            current = "" if stage in ("load", "coverage") else st.get("up_to_date", 0)
            lines.append(f"  {stage:<9} {ran:>5} {current:>7} {st.get('seconds', 0.0):>7.2f} s  "
                         f"{_detail(report, stage)}".rstrip())
    lines.append("  " + tiles_line(report))
    if report.failure_reason:
        lines.append(f"  failed: {report.failure_reason}")
    return "\n".join(lines)


def _detail(report: BuildReport, stage: str) -> str:
    st = report.stages[stage]
    if st.get("failed"):
        return f"FAILED ({st['failed']} task(s))"
    if stage in ("engines", "shards") and not st.get("ran"):
        return ""
    if stage == "engines":
        return f"{report.engines_built} built, {report.engines_reused} reused from disk"
    if stage == "shards":
        text = (f"{report.descriptors_generated} descriptors embedded, "
                f"{report.descriptors_reused} carried over")
        if report.local_features_generated or report.local_features_reused:
            text += (f"; local features of {report.local_features_generated} tiles extracted, "
                     f"{report.local_features_reused} carried over")
        return text
    if stage == "manifest" and report.manifest_hash:
        return f"Manifest v{report.manifest_version} sha256 {report.manifest_hash[:16]}"
    return ""


def tiles_line(report: BuildReport) -> str:
    if report.tiles_expected is None:
        return "tiles: unknown (the request did not load)"
    text = (f"tiles: {report.tiles_present} present, {report.tiles_missing} missing "
            f"of {report.tiles_expected} in area.bbox/zooms")
    if report.tiles_missing and not report.require_complete:
        text += " (allowed: area.require_complete = false; `c10 map .` shows where)"
    if report.tiles_out_of_scope:
        text += (f"; {report.tiles_out_of_scope} more in tiles/ outside area.bbox/zooms (kept, "
                 "not indexed or signed)")
    return text
