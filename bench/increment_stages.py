"""One sample of a +1 % rebuild per stage: a fresh cache of N tiles built cold, then +1 % as a
strip, then +1 % as random holes, then a no-op; prints JSON (wall and .c10/report.json stages).
Interleave runs of two trees for an A/B: `PYTHONPATH=OTHER_TREE python bench/increment_stages.py
--tiles 100000` (OTHER_TREE/c10/rules -> ../rules), then the same without PYTHONPATH."""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import incremental  # noqa: E402
import region  # noqa: E402

from c10.trust.keys import generate_key  # noqa: E402


def sample(work: Path, args) -> dict:
    generate_key(work / "key.pem")
    root, extra = work / "cache", args.tiles // 100
    first, holes, bbox = incremental.layout(args.tiles + extra, extra, args.seed, "random")
    strip, first = first[-extra:], first[:-extra]
    pool = region.jpeg_pool(args.tile_size, args.distinct, args.seed)
    region.write_tiles(root, first, pool, 0)
    region.configure(root, work / "key.pem", args, bbox)
    out = {"tiles": len(first), "cold": region.build(root)}
    region.write_tiles(root, strip, pool, 2)
    out["strip"] = region.build(root)
    region.write_tiles(root, holes, pool, 1)
    out["holes"] = region.build(root)
    out["noop"] = region.build(root)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiles", type=int, default=100_000)
    parser.add_argument("--tile-size", type=int, default=32)
    parser.add_argument("--distinct", type=int, default=4096)
    parser.add_argument("--input", type=int, default=32)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--factory", default="IVF1024,SQ8")
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="c10-increment-"))
    try:
        print(json.dumps(sample(work, args), indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
