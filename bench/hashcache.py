"""The tiles' hash cache at N tiles: a +1 % strip's load and save, per column vs one file (JSON)."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from c10.store import atomic  # noqa: E402
from c10.store.hashcache import HashCache  # noqa: E402
from c10.store.layout import HASH_CACHES, tile_hashes_relpath  # noqa: E402

ONE_FILE = HASH_CACHES["tiles"] + ".before"  # (the real name would be migrated by HashCache)


def entries(side: int, x0: int = 76000) -> dict[str, dict[str, list]]:
    """column -> {tile path: [stat key..., blake3]} for a side x side square at zoom 17."""
    digest = "ab" * 32
    return {str(x): {f"tiles/17/{x}/{y}.jpg": [20480, 1_700_000_000_000_000_000 + y, 10**7 + y,
                                               1_700_000_000_000_000_000 + y, digest]
                     for y in range(side)} for x in range(x0, x0 + side)}


def one_file(root: Path, columns: dict, touched: list[str]) -> float:
    """What a build did before: load the one file, add the touched columns' tiles, save it all."""
    start = time.perf_counter()
    bucket = json.loads((root / ONE_FILE).read_bytes())
    for x in touched:
        bucket.update(columns[x])
    atomic.write_bytes(root / ONE_FILE,
                       json.dumps(bucket, separators=(",", ":"), sort_keys=True).encode())
    return time.perf_counter() - start


def per_column(root: Path, columns: dict, touched: list[str]) -> float:
    """What a build does now: HashCache loads and saves only the touched columns."""
    start = time.perf_counter()
    hashes = HashCache(root)
    for x in touched:
        for rel, entry in columns[x].items():
            hashes._bucket(rel)[1][rel] = entry  # as remember() does, without a real stat
        hashes._dirty.add(f"17/{x}")
    hashes.save()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tiles", type=int, default=1_000_000)
    ap.add_argument("--percent", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    side = int(args.tiles ** 0.5)
    columns = entries(side)
    touched = list(columns)[-max(1, round(side * args.percent / 100)):]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / ".c10").mkdir()
        everything = {rel: e for col in columns.values() for rel, e in col.items()}
        atomic.write_bytes(root / ONE_FILE, json.dumps(everything).encode())
        for x, col in columns.items():
            atomic.write_unsynced(root / tile_hashes_relpath("17", x), json.dumps(col).encode())
        times = {"one_file": [], "per_column": []}
        for _ in range(args.runs):  # interleaved
            times["one_file"].append(one_file(root, columns, touched))
            times["per_column"].append(per_column(root, columns, touched))
        print(json.dumps({"tiles": side * side, "columns_touched": len(touched),
                          "one_file_mb": round((root / ONE_FILE).stat().st_size / 2**20, 1),
                          **{f"{k}_s_median": round(statistics.median(v), 3)
                             for k, v in times.items()},
                          **{f"{k}_s": [round(t, 3) for t in v] for k, v in times.items()}}))


if __name__ == "__main__":
    main()
