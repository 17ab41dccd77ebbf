"""The BuildReport after every `doit build_cache`: .c10/report.json, the summary table, failures."""
from __future__ import annotations

import json
import re
import shutil

from c10.report import BuildOutcome, BuildReport, read_report, summary
from c10.rules.driver import run_build
from c10.store.layout import REPORT_PATH
from c10.store.lock import BuildLock


def build(root, capsys, *args) -> tuple[int, str]:
    code = run_build(root, list(args) or ["build_cache"])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_every_build_writes_a_report_and_prints_a_table(cache, capsys, tmp_path):
    code, out = build(cache, capsys)
    assert code == 0
    first = read_report(cache)
    assert first.outcome is BuildOutcome.SUCCESS and first.engines_built == 1
    assert first.shards_generated == first.stages["shards"]["ran"] > 1
    assert first.descriptors_generated == first.tiles_present == len(first.rebuilt_tiles)
    assert set(first.stages) == {"load", "engines", "shards", "index", "coverage", "manifest"}
    assert all(s["seconds"] >= 0 for s in first.stages.values()) and first.elapsed_s > 0
    assert re.search(r"^c10 build report: SUCCESS in [\d.]+ s", out, re.M)
    assert re.search(r"^  shards +\d+ +0 +[\d.]+ s  \d+ descriptors embedded", out, re.M)

    code, out = build(cache, capsys)  # warm: nothing changed
    warm = read_report(cache)
    assert warm.outcome is BuildOutcome.IDEMPOTENT_NO_OP and "IDEMPOTENT_NO_OP" in out
    assert (warm.engines_built, warm.engines_reused, warm.descriptors_generated,
            warm.shards_generated, warm.rebuilt_tiles) == (0, 0, 0, 0, ())
    assert warm.manifest_hash == first.manifest_hash and warm.manifest_version == 1

    tile = sorted((cache / "tiles/15").rglob("*.jpg"))[7]
    shutil.move(tile, tmp_path / "t.jpg")
    build(cache, capsys)
    shutil.move(tmp_path / "t.jpg", tile)
    code, out = build(cache, capsys)  # one tile came back: exactly it is re-embedded
    again = read_report(cache)
    z, x, y = 15, int(tile.parent.name), int(tile.stem)
    assert again.rebuilt_tiles == ((z, x, y),) and again.descriptors_generated == 1
    assert again.descriptors_reused > 0 and again.manifest_version == 3


def test_failed_build_reports_why(cache, capsys):
    build(cache, capsys)
    (cache / "models" / "extra.bin").write_bytes(b"x")
    code, out = build(cache, capsys)
    report = read_report(cache)
    assert code != 0 and report.outcome is BuildOutcome.FAILURE
    assert (report.error_type == "ManifestCoverageError"
            and "models/extra.bin" in report.failure_reason)
    assert report.manifest_version == 1  # the Manifest in force is still the previous one
    assert re.search(r"^c10 build report: FAILURE", out, re.M) and "  failed: " in out


def test_bad_request_still_leaves_a_report(cache, capsys):
    text = (cache / "c10.toml").read_text()
    (cache / "c10.toml").write_text(text.replace("[index]", "[index]\nfactroy = 1"))
    code, out = build(cache, capsys)
    report = read_report(cache)
    assert (code != 0 and report.outcome is BuildOutcome.FAILURE
            and report.error_type == "ConfigError")
    assert "index.factroy" in report.failure_reason and report.tiles_expected is None


def test_a_refused_concurrent_build_does_not_touch_the_report(cache, capsys):
    build(cache, capsys)
    before = (cache / REPORT_PATH).read_bytes()
    holder = BuildLock(cache)
    holder.acquire()
    try:
        code, out = build(cache, capsys)
    finally:
        holder.release()
    assert code != 0 and "report not written" in out
    assert (cache / REPORT_PATH).read_bytes() == before


def test_other_doit_commands_write_no_report(cache, capsys):
    build(cache, capsys, "list")
    build(cache, capsys, "engines")
    assert not (cache / REPORT_PATH).exists()


def test_report_json_round_trip_and_unknown_outcome():
    report = BuildReport(BuildOutcome.SUCCESS, 1, 2, 3, "ab", None, None, 1.5,
                         stages={"load": {"seconds": 0.1}}, rebuilt_tiles=((15, 1, 2),))
    data = json.loads(json.dumps(report.to_json()))
    assert BuildReport.from_json(data) == report
    assert (BuildReport.from_json(data | {"outcome": "partial", "future_field": 1}).outcome
            is BuildOutcome.FAILURE)
    assert "c10 build report: SUCCESS" in summary(report)


def test_manifest_facts_read_the_canonical_head_and_tail_or_parse(tmp_path):
    from c10.report import manifest_facts

    ident = "ab" * 32
    (tmp_path / "Manifest.json").write_bytes(b'{"build_identity":"%s","files":[],"version":7}\n'
                                             % ident.encode())
    facts = manifest_facts(tmp_path)
    assert (facts["manifest_version"], facts["build_identity"]) == (7, ident)
    (tmp_path / "Manifest.json").write_text('{"version": 8, "build_identity": "cd"}')
    assert (manifest_facts(tmp_path)["manifest_version"],
            manifest_facts(tmp_path)["build_identity"]) == (8, "cd")
    assert manifest_facts(tmp_path / "none")["manifest_hash"] is None
