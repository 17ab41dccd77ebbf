"""Retrieval with models.global.decode = "scaled" against "full", same run, same tiles (demo-like
JPEGs at --tile-size px; the demo's generated global model, or with --real the pretrained
ALIKED global export at 256 px, c10[export]): recall@1/@5 of perturbed tiles and of
camera-like frames, given to the searcher as decoded images (their full-size pixels) and as JPEG
files (decoded as the cache's mode says); the cosine between the two modes' rows; prints JSON.
Run as `env -u PYTHONDONTWRITEBYTECODE python bench/decode.py`."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from embed import make_cache  # noqa: E402  (bench/embed.py: the same cache)

from c10.trust.keys import generate_key, load_signing_key, public_key_pem  # noqa: E402


def build(root: Path) -> None:
    from c10.rules.driver import run_build

    os.environ["C10_NO_PROGRESS"] = "1"
    with contextlib.redirect_stdout(sys.stderr):
        if run_build(root) != 0:
            raise SystemExit(f"bench/decode.py: the build of {root} failed")


def export_real(where: Path) -> Path:
    from c10.tools.export import export_models

    with contextlib.redirect_stdout(sys.stderr):
        return export_models(where, log=lambda *a: print(*a, file=sys.stderr))["global"]


def use_real(root: Path, onnx: Path) -> None:
    """The cache's global model replaced by the ALIKED export, with its preprocessing (RGB in
    [0, 1], c10.tools.export.models_toml)."""
    import shutil

    shutil.copyfile(onnx, root / "models" / "global.onnx")
    toml = root / "c10.toml"
    text = toml.read_text().replace("mean = [0.485, 0.456, 0.406]", "mean = [0.0, 0.0, 0.0]")
    text = text.replace("std = [0.229, 0.224, 0.225]", "std = [1.0, 1.0, 1.0]")
    toml.write_text(text.replace("batch_size = 32", "batch_size = 16", 1))


class AsFiles:
    """A searcher whose images arrive as JPEG files (quality 95), decoded as query_file does."""

    def __init__(self, searcher):
        self.searcher = searcher

    def __getattr__(self, name):
        return getattr(self.searcher, name)

    def embed(self, images):
        from c10.features.preprocess import open_tile

        def as_file(img):
            data = io.BytesIO()
            img.convert("RGB").save(data, "JPEG", quality=95)
            return open_tile(io.BytesIO(data.getvalue()), self.searcher.prep)

        return self.searcher.embed([as_file(img) for img in images])


def measure(root: Path, pub: Path, args) -> dict:
    from c10.features.shards import read_shard
    from c10.query.flight import FlightCache
    from c10.query.frames import frames_selftest
    from c10.query.search import selftest

    cache = FlightCache.open(root, [pub])
    searcher, _ = cache.searcher()
    out = {"rows": {}}
    for shard in sorted((root / "shards/global").rglob("*.npy")):
        for r in read_shard(shard):
            out["rows"][(int(r["x"]), int(r["y"]))] = r["desc"]
    for name, s in (("images", searcher), ("jpeg_files", AsFiles(searcher))):
        tiles = selftest(s, cache.load_tile, args.queries, "strong", args.seed)
        frames = frames_selftest(s, cache.load_tile, args.frames, args.seed)
        out[name] = {"tiles_strong_recall_at_1": tiles.recall_at_1,
                     "tiles_strong_recall_at_5": tiles.recall_at_5,
                     "frames_recall_at_1": frames.to_json()["recall_at_1"],
                     "frames_recall_at_5": frames.to_json()["recall_at_5"]}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiles", type=int, default=256)
    p.add_argument("--tile-size", type=int, default=512)
    p.add_argument("--input", type=int, default=224)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--frames", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--real", action="store_true",
                   help="the pretrained ALIKED global model (c10 export-models; input 256)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="c10-bench-decode-") as tmp:
        work = Path(tmp)
        key = work / "key.pem"
        generate_key(key)
        pub = work / "key.pub.pem"
        pub.write_bytes(public_key_pem(load_signing_key(key, passphrase=None, cache_root=None)))
        real = export_real(work / "real") if args.real else None
        arms = {}
        for mode in ("full", "scaled"):
            os.environ["XDG_STATE_HOME"] = str(work / "state" / mode)  # no reuse across arms
            root = work / mode
            make_cache(root, args.tiles, "onnxruntime", key, 256 if real else args.input, 16,
                       "fp32", args.tile_size, mode)
            if real:
                use_real(root, real)
            build(root)
            arms[mode] = measure(root, pub, args)
    full, scaled = arms["full"].pop("rows"), arms["scaled"].pop("rows")
    cosine = np.array([float(full[k] @ scaled[k]) for k in full])
    print(json.dumps({"bench": "decode", "tile_size": args.tile_size,
                      "model": "aliked-n16 global" if args.real else "generated (netgen)",
                      "input": 256 if args.real else args.input,
                      "tiles": len(full), "seed": args.seed,
                      "loadavg": [round(v, 2) for v in os.getloadavg()],
                      "row_cosine_full_vs_scaled": {"min": round(float(cosine.min()), 5),
                                                    "median": round(float(np.median(cosine)), 5)},
                      **arms}, indent=2))


if __name__ == "__main__":
    main()
