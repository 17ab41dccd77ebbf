"""Real networks on the demo tiles: recall@1 of retrieval alone vs + LightGlue re-rank, and
images/s per backend for each network; prints JSON. Needs c10[export] (it exports ALIKED/LightGlue
with --real-models).

    python bench/localize.py [--tiles 300] [--queries 100] [--keypoints 256] [--k 5] [--dir DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from c10.features.engines import EngineSpec, build_engine, get_backend, load_engine
from c10.query.rerank import localize_test
from c10.rules.driver import run_build
from c10.tools import synth
from c10.tools.demo import make_demo

# (backend, deformable-conv form): the form each backend compiles, plus GridSample on onnxruntime
# to show what the OpenVINO form costs there.
CASES = (("onnxruntime", "native"), ("onnxruntime", "grid"), ("openvino", "grid"))


def recall(root: Path, pub: Path, queries: int, k: int, seed: int) -> dict:
    from c10.query.flight import FlightCache

    cache = FlightCache.open(root, [pub])
    searcher, _ = cache.searcher()
    reranker = cache.reranker()
    out = {}
    for strength in ("strong", "mild"):
        t0 = time.perf_counter()
        r = localize_test(searcher, reranker, cache.load_tile, n=queries, strength=strength,
                          seed=seed, k=k)
        out[strength] = {"queries": r.n, "k": r.k, "recall@1_retrieval": r.recall_retrieval,
                         "recall@1_reranked": r.recall_reranked, f"recall@{k}": r.recall_at_k,
                         "seconds": round(time.perf_counter() - t0, 1)}
    return out


def models_for(root: Path, keypoints: int, work: Path) -> dict[str, Path]:
    """Models dir per deform form: the demo's own, the other one exported here."""
    from c10.tools.export import MODEL_FILES, read_metadata

    have = read_metadata(root / "models" / "global.onnx")["c10.deform"]
    other = "grid" if have == "native" else "native"
    from c10.tools.export import nets, writer

    out = work / other
    out.mkdir(parents=True)
    aliked = nets.load_aliked("n16", keypoints)
    for role, build in (("global", writer.global_onnx), ("local", writer.local_onnx)):
        meta = writer.metadata(role, "n16", keypoints, other)
        (out / MODEL_FILES[role]).write_bytes(build(aliked, other, meta))
    (out / MODEL_FILES["matcher"]).symlink_to(root / "models" / MODEL_FILES["matcher"])
    return {have: root / "models", other: out}


def rate(run, count: int, seconds: float) -> float:
    """Items/s over a timed window after one warm-up call."""
    run()
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < seconds:
        run()
        calls += 1
    return round(calls * count / (time.perf_counter() - start), 2)


def engine(path: Path, backend: str, work: Path, shape, batch):
    spec = EngineSpec(model=path.stem, onnx_path=path, onnx_hash=f"{path.parent.name}-{path.stem}",
                      input_shape=shape, precision="fp32", batch=batch)
    built, _ = build_engine(spec, get_backend(backend), work / "engines")
    return load_engine(built, spec, get_backend(backend))


def throughput(models: dict[str, Path], keypoints: int, batch: int, seconds: float,
               work: Path) -> dict:
    tiles = np.stack([np.asarray(synth.render_tile(16, 38320 + i, 22132),
                                 np.float32).transpose(2, 0, 1) / 255
                      for i in range(batch)])
    out = {}
    for backend, deform in CASES:
        d = models[deform]
        where = work / f"{backend}-{deform}"
        glob = engine(d / "global.onnx", backend, where, (3, 256, 256), (1, batch, batch))
        local = engine(d / "local.onnx", backend, where, (3, 256, 256), (1, 1, 1))
        feats = local.run({"image": tiles[:1]})
        match = engine(d / "matcher.onnx", backend, where, None, (1, 1, 1))
        feeds = {"kpts0": feats[0], "desc0": feats[1], "kpts1": feats[0][:, ::-1].copy(),
                 "desc1": feats[1][:, ::-1].copy()}
        out[f"{backend}/{deform}"] = {
            f"global_images_per_s_batch{batch}": rate(lambda: glob(tiles), batch, seconds),
            "local_images_per_s": rate(lambda: local.run({"image": tiles[:1]}), 1, seconds),
            f"matcher_pairs_per_s_K{keypoints}": rate(lambda: match.run(feeds), 1, seconds)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--tiles", type=int, default=300, help="about how many demo tiles (default 300)")
    p.add_argument("--queries", type=int, default=100,
                   help="perturbed tiles queried per strength (default 100)")
    p.add_argument("--keypoints", type=int, default=256)
    p.add_argument("--k", type=int, default=5,
                   help="retrieved tiles re-ranked by matches (default 5)")
    p.add_argument("--batch", type=int, default=16,
                   help="global model batch for images/s (default 16)")
    p.add_argument("--seconds", type=float, default=5.0, help="timed window per figure (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", type=Path,
                   help="an existing `c10 demo --real-models` cache (default: build one)")
    p.add_argument("--trusted-key", type=Path,
                   help="the public key of --dir's signer (default: the demo key's, if made here)")
    p.add_argument("--skip-recall", action="store_true", help="images/s only")
    args = p.parse_args()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = args.dir or work / "demo"
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # stdout is for the JSON only
            if args.dir is None and make_demo(root, run_build, tiles=args.tiles,
                                              key=work / "key.pem", backend="onnxruntime",
                                              real_models=True, keypoints=args.keypoints) != 0:
                raise SystemExit("bench/localize.py: the demo build failed")
        built = round(time.perf_counter() - t0, 1)
        result = {"cache": str(root), "tiles": len(list((root / "tiles").rglob("*.*"))),
                  "keypoints": args.keypoints, "demo_build_seconds": built,
                  "localize": (None if args.skip_recall
                               else recall(root, args.trusted_key or work / "key.pub.pem",
                                           args.queries, args.k, args.seed)),
                  "throughput": throughput(models_for(root, args.keypoints, work), args.keypoints,
                                           args.batch, args.seconds, work),
                  "loadavg_1min": [round(load, 2), round(os.getloadavg()[0], 2)],
                  "cpus": os.cpu_count()}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
