"""Engine benchmark: compile/load time, images/s at batch 1/8/32, agreement with fp32 ORT; prints
JSON. `--real-models [--keypoints K] [--rounds N]`: the real ALIKED exports instead
(bench/engines_real.py; needs the export extra)."""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import blake3
import numpy as np

from c10.features.backends import cpu_info
from c10.features.backends.onnxruntime import OnnxRuntimeBackend
from c10.features.backends.openvino import OpenVinoBackend
from c10.features.backends.tensorrt import TensorRTBackend
from c10.features.engines import EngineSpec, build_engine, load_engine
from c10.tools import synth

INPUT = 224
BATCHES = (1, 8, 32)
ROUNDS = 8
# INT8: demo-like tiles (c10.tools.synth, the conftest area at zooms 15-16), calibrated on the
# first CALIBRATION, gated and scored on the next HOLDOUT
TILES_BBOX, TILES_ZOOMS = (50.43, 30.49, 50.47, 30.56), (15, 16)
CALIBRATION = HOLDOUT = 96
PREP = ((INPUT, INPUT), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "rgb", "bilinear", "full")


def write_model(path: Path) -> str:
    """The demo's global model when c10.netgen has it, else a comparable CNN of our own."""
    try:
        from c10.tools.netgen import write_global_model
    except ImportError:
        write_global_model = None
    if write_global_model is not None:
        write_global_model(path, input_size=INPUT, dim=256, seed=0)
        return "c10.netgen.write_global_model(input_size=224, dim=256)"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_engines_models import tiny_cnn

    tiny_cnn(path, size=INPUT, dim=256, widths=(32, 64, 128, 256))
    return "tests/test_engines_models.tiny_cnn(224, widths=32/64/128/256, dim=256)"


def throughput(run, batch: np.ndarray, seconds: float = 0.4) -> float:
    """Images/s over one timed window (after a warm-up call that allocates and picks kernels)."""
    run(batch)
    calls, start = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - start < seconds:
        run(batch)
        calls += 1
    return calls * len(batch) / (time.perf_counter() - start)


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return round(float(cos.min()), 6)


def prepare(backend, spec: EngineSpec, engines: Path, data: np.ndarray, ref: np.ndarray):
    t0 = time.perf_counter()
    path, _ = build_engine(spec, backend, engines)
    t1 = time.perf_counter()
    runner = load_engine(path, spec, backend)
    t2 = time.perf_counter()
    sidecar = json.loads(path.with_suffix(".json").read_text())
    return runner, {"version": backend.version(), "precision": spec.precision,
                    "build": sidecar["build"], "compile_s": round(t1 - t0, 3),
                    "load_s": round(t2 - t1, 3), "engine_bytes": path.stat().st_size,
                    "min_cosine_vs_fp32_onnxruntime": min_cosine(runner(data), ref)}


def measure(runners: dict, data: np.ndarray, rounds: int) -> dict:
    """Interleaved windows; best = the quietest window, median = what a shared host gives."""
    seen: dict = {name: {str(n): [] for n in BATCHES} for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            for n in BATCHES:
                seen[name][str(n)].append(throughput(run, data[:n]))
    return {name: {"best": {n: round(max(v), 1) for n, v in per.items()},
                   "median": {n: round(statistics.median(v), 1) for n, v in per.items()}}
            for name, per in seen.items()}


def main() -> None:
    import onnxruntime as ort

    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="c10-bench-") as tmp:
        onnx_path = Path(tmp) / "global.onnx"
        model = write_model(onnx_path)
        spec = EngineSpec("global", onnx_path, blake3.blake3(onnx_path.read_bytes()).hexdigest(),
                          (3, INPUT, INPUT))
        data = np.random.default_rng(0).standard_normal((32, 3, INPUT, INPUT)).astype(np.float32)
        plain = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        name = plain.get_inputs()[0].name
        ref = plain.run(None, {name: data})[0]
        engines = Path(tmp) / "engines"
        configs = {
            "onnxruntime": (OnnxRuntimeBackend(), spec, engines),
            "openvino": (OpenVinoBackend(), spec, engines),  # the default: THROUGHPUT, split batch
            "openvino_hint_LATENCY": (OpenVinoBackend("LATENCY"), spec, Path(tmp) / "latency"),
            "openvino_bf16": (OpenVinoBackend(), replace(spec, precision="bf16"), engines),
        }
        tiles = demo_tiles(Path(tmp) / "tiles")
        int8 = replace(spec, precision="int8", calibration_hash="tiles:bench", preprocess=PREP,
                       calibration_tiles=tiles[:CALIBRATION],
                       holdout_tiles=tiles[CALIBRATION:CALIBRATION + HOLDOUT])
        configs["onnxruntime_int8"] = (OnnxRuntimeBackend(), int8, engines)
        configs["openvino_int8"] = (OpenVinoBackend(), int8, engines)  # NNCF (c10[openvino-int8])
        runners = {"plain_onnxruntime_session": lambda b: plain.run(None, {name: b})}
        results: dict = {"plain_onnxruntime_session": {}}
        for key, (backend, sp, where) in configs.items():
            runners[key], results[key] = prepare(backend, sp, where, data, ref)
        for key in ("onnxruntime_int8", "openvino_int8"):
            results[key] |= int8_figures(results[key])
        for key, ips in measure(runners, data, ROUNDS).items():
            results[key]["images_per_s"] = ips["best"]
            results[key]["images_per_s_median"] = ips["median"]
    trt = TensorRTBackend()
    results["tensorrt"] = {"available": trt.available(), "note": "not installable here (no GPU, "
                           "vendor-only wheels); nothing was compiled or run"}
    print(json.dumps({
        "model": model, "input": [3, INPUT, INPUT], "cpu": cpu_info()["model"],
        "cpus": os.cpu_count(), "load_average_before": load_before,
        "method": f"{ROUNDS} interleaved ~0.4 s windows per backend and batch: images_per_s is "
                  "the best window, images_per_s_median the median (the host is shared)",
        "backends": results,
        "openvino_over_onnxruntime_batch32": {
            stat: {k: _ratio(results, k, "onnxruntime", stat)
                   for k in ("openvino", "openvino_bf16", "openvino_hint_LATENCY")}
            for stat in ("images_per_s", "images_per_s_median")},
        "int8_over_plain_onnxruntime_batch32": {
            stat: {k: _ratio(results, k, "plain_onnxruntime_session", stat)
                   for k in ("onnxruntime_int8", "openvino_int8")}
            for stat in ("images_per_s", "images_per_s_median")},
        "openvino_over_plain_onnxruntime_batch32": {
            stat: _ratio(results, "openvino", "plain_onnxruntime_session", stat)
            for stat in ("images_per_s", "images_per_s_median")},
    }, indent=2))


def demo_tiles(where: Path) -> tuple[str, ...]:
    """Synthetic aerial tiles as the demo makes them, in an order unrelated to place."""
    ids = synth.make_tiles(where, TILES_BBOX, TILES_ZOOMS)
    ids.sort(key=lambda t: blake3.blake3(f"{t[0]}/{t[1]}/{t[2]}".encode()).digest())
    return tuple(str(where / str(z) / str(x) / f"{y}.jpg") for z, x, y in ids)


def int8_figures(result: dict) -> dict:
    """The INT8 engine's gate figures on held-out tiles (from its sidecar) and its calibration
    time; its random-data cosine kept under its own name (the others' is on random data)."""
    build = result["build"]
    gate = build["int8_gate"]
    return {"min_cosine_vs_fp32_onnxruntime_random_data": result.pop(
                "min_cosine_vs_fp32_onnxruntime"),
            "min_cosine_vs_fp32_onnxruntime": gate["min_cosine"],
            "recall_at_1": gate["recall_at_1"], "recall_at_1_fp32": gate["recall_at_1_fp32"],
            "recall_at_1_drop": gate["recall_at_1_drop"], "holdout_tiles": gate["samples"],
            "calibration_tiles": build["calibration_samples"],
            "calibration_s": build["calibration_s"]}


def _ratio(results: dict, a: str, b: str, stat: str) -> float:
    return round(results[a][stat]["32"] / results[b][stat]["32"], 2)


if __name__ == "__main__":
    if "--real-models" in sys.argv:
        from engines_real import main as real_main

        real_main(sys.argv[1:])
    else:
        main()
