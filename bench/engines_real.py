"""`bench/engines.py --real-models`: the real ALIKED exports, fp32 and INT8; prints JSON."""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import blake3

from c10.features.backends import cpu_info
from c10.features.backends.onnxruntime import OnnxRuntimeBackend
from c10.features.backends.openvino import OpenVinoBackend
from c10.features.engines import EngineSpec, build_engine, load_engine
from c10.features.int8 import _tile_tensors

SIDE = 256  # the exports' input (c10.tools.export.IMAGE_SIZE)
# ALIKED takes RGB in [0, 1]; the exports' c10.toml tables (c10.tools.export.models_toml)
PREP = ((SIDE, SIDE), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "rgb", "bilinear", "full")
BATCHES = (1, 8, 32)


def export(where: Path, keypoints: int) -> dict[str, Path]:
    """{"native": dir, "grid": dir} of global/local.onnx (DeformConv for ONNX Runtime, GridSample
    for OpenVINO), and the matcher in "native"."""
    from c10.tools.export import nets, writer

    writer.export_models(where / "native", keypoints=keypoints, deform="native",
                         log=lambda *_: None)
    grid = where / "grid"
    grid.mkdir()
    aliked = nets.load_aliked("n16", keypoints)
    for role, build in (("global", writer.global_onnx), ("local", writer.local_onnx)):
        meta = writer.metadata(role, "n16", keypoints, "grid")
        (grid / f"{role}.onnx").write_bytes(build(aliked, "grid", meta))
    return {"native": where / "native" / "models", "grid": grid}


def rate(run, make_feed, seconds: float, callers: int = 1) -> float:
    """Images/s of `callers` threads each calling run(make_feed()) for `seconds` (warm-up first)."""
    feed = make_feed()
    run(feed)
    done, stop = [0] * callers, time.perf_counter() + seconds

    def loop(i: int) -> None:
        while time.perf_counter() < stop or done[i] < 2:
            run(feed)
            done[i] += len(feed)

    start = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - start)


def prepare(backend, spec: EngineSpec, engines: Path) -> tuple:
    t0 = time.perf_counter()
    path, _ = build_engine(spec, backend, engines)
    t1 = time.perf_counter()
    runner = load_engine(path, spec, backend)
    build = json.loads(path.with_suffix(".json").read_text())["build"]
    return runner, {"version": backend.version(), "precision": spec.precision,
                    "compile_s": round(t1 - t0, 3), "engine_bytes": path.stat().st_size,
                    **gate_figures(build)}


def gate_figures(build: dict) -> dict:
    gate = build.get("int8_gate")
    if not gate:
        return {}
    out = {"calibration_tiles": build["calibration_samples"],
           "calibration_s": build["calibration_s"], "holdout_tiles": gate.get("samples")
           or gate.get("pairs")}
    if "match_retention" in gate:
        return out | {k: gate[k] for k in ("match_retention", "pairing", "correct_fp32",
                                           "correct_int8", "matches_fp32", "matches_int8")}
    return out | {"min_cosine_vs_fp32_onnxruntime": gate["min_cosine"],
                  "recall_at_1": gate["recall_at_1"], "recall_at_1_fp32": gate["recall_at_1_fp32"],
                  "recall_at_1_drop": gate["recall_at_1_drop"]}


def specs(models: dict, role: str, tiles: tuple, calibration: int, holdout: int) -> dict:
    """name -> (backend, spec) of the plain fp32 baseline's peers and INT8 engines of `role`."""
    native, grid = (models[f] / f"{role}.onnx" for f in ("native", "grid"))
    batch = (1, 32, 64) if role == "global" else (1, 1, 1)

    def spec(path, precision="fp32"):
        s = EngineSpec(role, path, blake3.blake3(path.read_bytes()).hexdigest(),
                       (3, SIDE, SIDE), batch=batch, role=role, precision=precision)
        if precision != "int8":
            return s
        return replace(s, calibration_hash="tiles:bench", preprocess=PREP,
                       calibration_tiles=tiles[:calibration],
                       holdout_tiles=tiles[calibration:calibration + holdout],
                       gate_matcher=str(models["native"] / "matcher.onnx"))

    return {"onnxruntime": (OnnxRuntimeBackend(), spec(native)),
            "onnxruntime_int8": (OnnxRuntimeBackend(), spec(native, "int8")),
            "openvino": (OpenVinoBackend(), spec(grid)),
            "openvino_int8": (OpenVinoBackend(), spec(grid, "int8"))}


def bench_role(models: dict, role: str, tiles: tuple, calibration: int, holdout: int,
               rounds: int, engines: Path) -> dict:
    import onnxruntime as ort

    data = _tile_tensors(EngineSpec(role, Path("x"), "x", None, preprocess=PREP), tiles[-32:])
    plain = ort.InferenceSession(str(models["native"] / f"{role}.onnx"),
                                 providers=["CPUExecutionProvider"])
    name = plain.get_inputs()[0].name
    runners = {"plain_onnxruntime_session": lambda b: plain.run(None, {name: b})[0]}
    results: dict = {"plain_onnxruntime_session": {}}
    for key, (backend, spec) in specs(models, role, tiles, calibration, holdout).items():
        runners[key], results[key] = prepare(backend, spec, engines / role)
    batches = BATCHES if role == "global" else (1,)
    seen = {k: {str(n): [] for n in batches} for k in runners}
    for _ in range(rounds):  # interleaved windows
        for key, run in runners.items():
            for n in batches:
                # a local model runs one tile a call, on every stream at once (the shard stage)
                callers = getattr(run, "streams", 1) if role == "local" else 1
                seen[key][str(n)].append(rate(run if role == "global" or key.startswith("plain")
                                              else run.stream, lambda: data[:n], 0.6 if
                                              role == "global" else 2.0, callers))
    for key, per in seen.items():
        results[key]["images_per_s_median"] = {n: round(statistics.median(v), 1)
                                               for n, v in per.items()}
        results[key]["images_per_s_best"] = {n: round(max(v), 1) for n, v in per.items()}
    base = results["plain_onnxruntime_session"]["images_per_s_median"]
    top = str(batches[-1])
    results["over_plain_onnxruntime_median"] = {
        k: round(v["images_per_s_median"][top] / base[top], 2) for k, v in results.items()
        if k != "plain_onnxruntime_session" and "images_per_s_median" in v}
    return results


def main(argv: list[str]) -> None:
    from c10.tools import synth

    keypoints = int(argv[argv.index("--keypoints") + 1]) if "--keypoints" in argv else 512
    rounds = int(argv[argv.index("--rounds") + 1]) if "--rounds" in argv else 5
    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="c10-bench-real-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        models = export(tmp / "export", keypoints)
        export_s = time.perf_counter() - t0
        ids = synth.make_tiles(tmp / "tiles", (50.43, 30.49, 50.47, 30.56), (15, 16))
        ids.sort(key=lambda t: blake3.blake3(f"{t[0]}/{t[1]}/{t[2]}".encode()).digest())
        tiles = tuple(str(tmp / "tiles" / str(z) / str(x) / f"{y}.jpg") for z, x, y in ids)
        out = {"global": bench_role(models, "global", tiles, 96, 96, rounds, tmp / "engines"),
               "local": bench_role(models, "local", tiles, 64, 32, rounds, tmp / "engines")}
    print(json.dumps({
        "models": f"c10 export-models: aliked-n16 at {SIDE}², {keypoints} keypoints; "
                  "onnxruntime on the DeformConv export, OpenVINO on the GridSample one",
        "export_s": round(export_s, 1), "cpu": cpu_info()["model"], "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "method": f"{rounds} interleaved windows per engine and batch (global 0.6 s, local 2 s; "
                  "local: one tile a call on each of the engine's streams at once); "
                  "held-out demo-like tiles from c10.tools.synth",
        "calibration": {"global": [96, 96], "local": [64, 32]}, "roles": out}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
