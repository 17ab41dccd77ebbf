"""Retrieval windows' build cost: cold, no-op and +1 tile at shards.stride 1 and 0.5, same run;
prints JSON. Run as `env -u PYTHONDONTWRITEBYTECODE python bench/windows.py --tiles 1000`."""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import incremental  # noqa: E402
from incremental import build, write_tiles  # noqa: E402

from c10.trust.keys import generate_key  # noqa: E402


def make_cache(root: Path, key: Path, args, stride: str) -> list[tuple[int, int]]:
    """args.tiles tiles in a square with one random hole (the tile the incremental build adds)."""
    return incremental.make_cache(root, key, args, extra=1, stride=stride)


def index_facts(root: Path) -> dict:
    """Rows of the id map and bytes of the index, from the committed Manifest's runtime spec."""
    manifest = json.loads((root / "Manifest.json").read_bytes())
    index = manifest["runtime"]["models"]["global"]["index"]
    ids = np.load(io.BytesIO((root / index["ids"]).read_bytes()))
    return {"rows": len(ids), "index_bytes": (root / index["index"]).stat().st_size,
            "div": index["div"]}


def run(args, tmp: Path, key: Path, stride: str) -> dict:
    root = tmp / f"stride-{stride}"
    added = make_cache(root, key, args, stride)
    cold = build(root)
    facts = index_facts(root)
    noop = build(root)
    write_tiles(root, added, args.tile_size, args.seed + 1)
    plus = build(root)
    return {"stride": float(stride), **facts,
            "cold": {"wall_s": round(cold["wall_s"], 2),
                     "shards_s": round(cold["stages"]["shards"], 2),
                     "index_s": round(cold["stages"]["index"], 3), "embedded": cold["embedded"]},
            "noop_wall_s": round(noop["wall_s"], 3),
            "plus_one_tile": {"wall_s": round(plus["wall_s"], 2),
                              "shards_s": round(plus["stages"]["shards"], 3),
                              "shard_tasks": plus["ran"]["shards"],
                              "index_s": round(plus["stages"]["index"], 3),
                              "embedded": plus["embedded"], "reused": plus["reused"]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiles", type=int, default=1000)
    parser.add_argument("--tile-size", type=int, default=256)
    parser.add_argument("--input", type=int, default=224, help="global model input (224: demo)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--first", choices=("1", "0.5"), default="1",
                        help="which stride builds first (to see the other load on the host)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="c10-bench-windows-") as tmp:
        tmp = Path(tmp)
        key = tmp / "operator.pem"
        generate_key(key)
        order = ("1", "0.5") if args.first == "1" else ("0.5", "1")
        results = sorted((run(args, tmp, key, stride) for stride in order),
                         key=lambda r: -r["stride"])
    tiles, windows = results
    print(json.dumps({"bench": "windows", "cpus": os.cpu_count(),
                      "loadavg": [round(v, 2) for v in os.getloadavg()],
                      "setup": {"tiles": args.tiles, "tile_px": args.tile_size,
                                "model_input": args.input, "dim": args.dim, "block": args.block,
                                "backend": args.backend},
                      "runs": results,
                      "ratio_0.5_over_1": {
                          "rows": round(windows["rows"] / tiles["rows"], 2),
                          "cold_wall": round(windows["cold"]["wall_s"] / tiles["cold"]["wall_s"],
                                             2),
                          "cold_embedded": round(windows["cold"]["embedded"]
                                                 / tiles["cold"]["embedded"], 2),
                          "plus_one_wall": round(windows["plus_one_tile"]["wall_s"]
                                                 / tiles["plus_one_tile"]["wall_s"], 2)}},
                     indent=2))


if __name__ == "__main__":
    main()
