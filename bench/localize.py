"""Localization on a demo cache, same run: tiles only against windows (shards.stride 0.5),
retrieval against re-rank, tile-aligned queries against camera-like frames; recall@1/@5, position
error, index size, build cost and warm per-frame query latency by stage; prints JSON. Real
networks (ALIKED/LightGlue, c10[export]) unless --synthetic; with them also images/s per backend.

    python bench/localize.py [--synthetic] [--tiles 300] [--frames 100] [--k 10] [--dir DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from c10.features.engines import EngineSpec, build_engine, get_backend, load_engine
from c10.query.frames import cut_frame, frames_selftest
from c10.query.rerank import localize_test
from c10.query.search import selftest
from c10.rules.driver import run_build
from c10.tools import synth
from c10.tools.demo import make_demo

# (backend, deformable-conv form): the form each backend compiles, plus GridSample on onnxruntime
# to show what the OpenVINO form costs there.
CASES = (("onnxruntime", "native"), ("onnxruntime", "grid"), ("openvino", "grid"))
INPUTS = ("tiles", "models", "c10.toml", "dodo.py", "doit.cfg")


def fresh_state(work: Path, name: str) -> None:
    """A new host state (ledgers, verifier state) for the next build: a build reuses descriptors
    from this host's ledger, so each arm's build must start without one to be timed."""
    os.environ["XDG_STATE_HOME"] = str(work / "state" / name)


def build_arm(src: Path, dst: Path, stride: float | None) -> dict:
    """Copy the inputs of `src`, set shards.stride (None: as it is), build; what it cost."""
    from c10.report import read_report

    dst.mkdir(parents=True)
    for name in INPUTS:
        (shutil.copytree if (src / name).is_dir() else shutil.copy2)(src / name, dst / name)
    if stride is not None:
        text = (dst / "c10.toml").read_text()
        (dst / "c10.toml").write_text(text.replace("[shards]\n", f"[shards]\nstride = {stride}\n",
                                                   1))
    fresh_state(dst.parent, dst.name)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        code = run_build(dst)
    seconds = time.perf_counter() - t0
    if code != 0:
        raise RuntimeError(f"the build of {dst} failed (exit {code}); see stderr")
    report = read_report(dst)
    return {"build_seconds": round(seconds, 1),
            "shards_stage_seconds": report.stages["shards"]["seconds"],
            "descriptors_embedded": report.descriptors_generated}


def windows_available() -> str | None:
    """None if this c10 has shards.stride, else why the windows arm cannot run."""
    from c10.config import Shards

    if "stride" not in {f.name for f in dataclasses.fields(Shards)}:
        return "this c10 has no `shards.stride` in c10.toml (retrieval windows not built yet)"
    return None


def index_facts(cache) -> dict:
    spec = cache.model()
    return {"rows": int(cache.searcher()[0].index.ntotal),
            "div": getattr(spec.index, "div", 1),  # a c10 without windows: tile rows
            "index_bytes": cache.entries[spec.index.index]["size"]}


def measure(root: Path, pub: Path, args, lightglue: bool) -> dict:
    """Every figure of one cache, from one warm process."""
    from c10.query.flight import FlightCache

    cache = FlightCache.open(root, [pub])
    searcher, _ = cache.searcher()
    mnn = cache.reranker("mnn")
    out = {"index": index_facts(cache)}
    t0 = time.perf_counter()
    aligned = selftest(searcher, cache.load_tile, args.queries, "strong", args.seed)
    located = localize_test(searcher, mnn, cache.load_tile, args.queries, "strong", args.seed,
                            args.k)
    out["aligned_strong"] = {"n": aligned.n, "recall_at_1": aligned.recall_at_1,
                             "recall_at_5": aligned.recall_at_5,
                             f"recall_at_1_rerank_top{args.k}_mnn": located.recall_reranked,
                             "seconds": round(time.perf_counter() - t0, 1)}
    runs = [("retrieval", None, 0, args.frames), ("rerank_mnn_top%d" % args.k, mnn, args.k,
                                                  args.frames),
            ("rerank_mnn_top50", mnn, 50, args.frames)]
    if lightglue:
        runs.append((f"rerank_lightglue_top{args.k}", cache.reranker("lightglue"), args.k,
                     args.lightglue_frames))
    out["frames"] = {}
    for name, reranker, k, n in runs:
        t0 = time.perf_counter()
        r = frames_selftest(searcher, cache.load_tile, n, args.seed, reranker, max(k, 1))
        row = {f: v for f, v in r.to_json().items() if f != "misses"}
        out["frames"][name] = row | {"seconds": round(time.perf_counter() - t0, 1)}
    out["latency"] = {f"mnn_top{args.k}": latency(cache, searcher, mnn, args.k, args.latency,
                                                  args.seed)}
    if lightglue:
        out["latency"][f"lightglue_top{args.k}"] = latency(
            cache, searcher, cache.reranker("lightglue"), args.k, max(3, args.latency // 4),
            args.seed)
    return out


def latency(cache, searcher, reranker, k: int, n: int, seed: int) -> dict:
    """Warm seconds per frame (median, p90, by stage) of embed + search + re-rank of the top k."""
    rng = np.random.default_rng(seed + 1)
    known, listed = searcher.listed_tiles(), set(searcher.paths)
    frames = []
    for i in rng.permutation(len(known)):
        if len(frames) == n + 1:
            break
        frame = cut_frame(cache.load_tile, listed, rng, known[i])
        if frame is not None:
            frames.append(frame.image)
    totals, stages = [], []
    for j, image in enumerate(frames):  # the first one warms engines and shard cache
        t0 = time.perf_counter()
        desc = searcher.embed([image])
        t1 = time.perf_counter()
        hits = searcher.search(desc, k)[0]
        t2 = time.perf_counter()
        verified = reranker.verify(image, hits, searcher.div)
        if j:
            totals.append(time.perf_counter() - t0)
            stages.append({"embed": t1 - t0, "search": t2 - t1, **verified.timings})
    return {"frames": len(totals), "seconds_median": round(statistics.median(totals), 4),
            "seconds_p90": round(float(np.percentile(totals, 90)), 4),
            "stages_median": {s: round(statistics.median(r[s] for r in stages), 4)
                              for s in stages[0]},
            "goal_seconds": 0.5}


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
    p.add_argument("--synthetic", action="store_true",
                   help="the demo's generated networks instead of ALIKED/LightGlue")
    p.add_argument("--tiles", type=int, default=300, help="about how many demo tiles (default 300)")
    p.add_argument("--frames", type=int, default=100, help="frames per figure (default 100)")
    p.add_argument("--lightglue-frames", type=int, default=30,
                   help="frames re-ranked with LightGlue (~0.2 s a candidate; default 30)")
    p.add_argument("--queries", type=int, default=100,
                   help="tile-aligned strongly perturbed queries (default 100)")
    p.add_argument("--latency", type=int, default=20, help="frames timed warm (default 20)")
    p.add_argument("--keypoints", type=int, default=256)
    p.add_argument("--k", type=int, default=10, help="candidates re-ranked (default 10)")
    p.add_argument("--batch", type=int, default=16,
                   help="global model batch for images/s (default 16)")
    p.add_argument("--seconds", type=float, default=5.0, help="timed window per figure (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", type=Path, help="an existing demo cache (default: build one)")
    p.add_argument("--trusted-key", type=Path,
                   help="the public key of --dir's signer (default: the demo key's, if made here)")
    p.add_argument("--skip-windows", action="store_true", help="tiles only")
    p.add_argument("--skip-throughput", action="store_true", help="no images/s per backend")
    args = p.parse_args()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fresh_state(work, "demo")
        src = args.dir or work / "demo"
        pub = args.trusted_key or work / "key.pub.pem"
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # stdout is for the JSON only
            if args.dir is None and make_demo(src, run_build, tiles=args.tiles,
                                              key=work / "key.pem", backend="onnxruntime",
                                              real_models=not args.synthetic,
                                              keypoints=args.keypoints) != 0:
                raise SystemExit("bench/localize.py: the demo build failed")
        result = {"cache": str(src), "networks": "generated" if args.synthetic else
                  f"ALIKED-n16 + LightGlue, {args.keypoints} keypoints",
                  "tiles": len(list((src / "tiles").rglob("*.*"))),
                  "demo_seconds": round(time.perf_counter() - t0, 1), "arms": {}}
        lightglue = not args.synthetic
        arms = {"tiles": 1.0}
        why = windows_available() if not args.skip_windows else "--skip-windows"
        if why is None:
            arms["windows"] = 0.5
        else:
            result["arms"]["windows"] = {"available": False, "why": why}
        for name, stride in arms.items():
            try:
                cost = build_arm(src, work / name, stride)
            except Exception as exc:  # a windows build this c10 cannot make yet is a result too
                if name == "tiles":
                    raise
                result["arms"][name] = {"available": False, "why": f"{type(exc).__name__}: {exc}"}
                continue
            result["arms"][name] = {"stride": stride, **cost,
                                    **measure(work / name, pub, args, lightglue)}
        if "build_seconds" in result["arms"].get("windows", {}):
            t, w = result["arms"]["tiles"], result["arms"]["windows"]
            result["windows_over_tiles"] = {
                key: round(w[key] / max(t[key], 1e-9), 2)
                for key in ("build_seconds", "shards_stage_seconds", "descriptors_embedded")}
        if not args.skip_throughput and not args.synthetic:
            result["throughput"] = throughput(models_for(src, args.keypoints, work),
                                              args.keypoints, args.batch, args.seconds, work)
        result |= {"loadavg_1min": [round(load, 2), round(os.getloadavg()[0], 2)],
                   "cpus": os.cpu_count()}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
