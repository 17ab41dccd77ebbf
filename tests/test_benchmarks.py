"""The seed's two benchmark cases (CP-TC-12 cold build, CP-TC-13 warm re-run) run end to end at a
tiny size: the scripts that measure them work and report what they claim; no timing is asserted
(figures are measured by the benchmarks themselves, docs/scale.md)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def run_bench(script: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], env=ENV,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_cold_build_and_warm_rerun_benchmarks_report_their_work():  # CP-TC-12, CP-TC-13
    """bench/incremental.py: a cold build embeds every tile (CP-TC-12's figure is its wall time),
    the warm re-run after it is timed (CP-TC-13: `noop_wall_s`), the +10 % build embeds only the
    new tiles, and a block size change embeds nothing (every row is reused by content)."""
    out = run_bench("incremental.py", "--tiles", "60", "--percent", "10", "--input", "32",
                    "--dim", "16", "--block", "4", "--tile-size", "64", "--then-block", "2")
    added = out["setup"]["added"]
    assert added == 6
    assert out["descriptors"] == {"cold_embedded": 60, "incremental_embedded": added,
                                  "incremental_reused": out["descriptors"]["incremental_reused"]}
    assert out["wall"]["cold_s"] > 0 and out["noop_wall_s"] > 0
    assert out["stages"]["shards"]["tasks_ran"][0] > 0
    assert out["then_block"]["embedded"] == 0 and out["then_block"]["reused"] == 60 + added


def test_the_manifest_tree_benchmark_reports_flat_and_tree():
    """bench/manifest.py --tree: every stage ran in its own process, the tree's root holds one entry
    per block (plus the non-tile files), the 1 % rewrite wrote 1 % of the lists, and verify
    expanded every tile of both formats."""
    out = run_bench("manifest.py", "--tree", "--sizes", "5000", "--repeat", "1")
    size = out["sizes"][0]
    blocks = size["write_tree"]["lists_written"]
    assert blocks == -(-5000 // 256) and size["write_tree"]["root_entries"] == blocks + 2
    assert size["rewrite_tree"]["lists_written"] == len(range(0, blocks, 100))
    tiles = size["verify_flat"]["entries"] - 2
    assert tiles >= 5000 and size["verify_tree"]["entries"] == tiles + blocks + 2
    assert all(size[s]["peak_rss_mb"] > 0 for s in ("write_flat", "write_tree", "verify_tree"))


def test_the_growing_index_benchmark_reports_an_update_equal_to_a_full_build():
    """bench/scale.py --grow at a tiny size: +1 % re-encodes only the new rows, the incremental
    index equals the full one, and the mmap'd index is searched at each nprobe."""
    out = run_bench("scale.py", "--grow", "--tiles", "4000", "--dim", "32", "--grow-factories",
                    "IVF16,SQ8", "--nprobes", "2,4", "--queries", "50")
    (grow,) = out["grow"]
    assert grow["incremental_equals_full"] is True
    assert grow["rows_encoded_incremental"] == grow["tiles_added"] == 40
    assert grow["rows_encoded_cold"] == 4000 - 40
    assert grow["latency"][0]["mapped"] == "OnDiskInvertedLists"
    assert [r["nprobe"] for r in grow["latency"][1:]] == [2, 4]


def test_noop_benchmark_compares_c10_bare_doit_and_ninja_on_the_same_files():
    """bench/noop.py: after a cold build the no-op runs only the coverage gate, and every
    comparison is timed in the same rounds (no timing is asserted)."""
    out = run_bench("noop.py", "--sizes", "40", "--runs", "1", "--block", "4")
    (row,) = out["results"]
    assert row["tiles"] == 40 and row["noop_ran"] == ["coverage"]
    assert row["heavy_modules_imported"] == []
    timed = [k for k, v in row.items() if isinstance(v, dict)]
    assert {"c10_noop", "bare_doit_per_file", "bare_doit_coarse_16_per_task"} <= set(timed)
    assert all(row[k]["median_s"] > 0 for k in timed)


def test_the_hash_cache_benchmark_times_one_file_and_per_column_on_the_same_entries():
    """bench/hashcache.py: a 1 % strip touches 1 of 20 columns; both layouts timed per round."""
    out = run_bench("hashcache.py", "--tiles", "400", "--runs", "1", "--percent", "5")
    assert out["tiles"] == 400 and out["columns_touched"] == 1 and out["one_file_mb"] > 0
    assert len(out["one_file_s"]) == len(out["per_column_s"]) == 1
