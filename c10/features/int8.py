"""INT8 engines on ONNX Runtime: calibration sample, static quantization, accuracy gate."""
from __future__ import annotations

import heapq
import io
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import blake3

from c10.canonical import digest
from c10.errors import CalibrationCacheError, ConfigError, EngineBuildError
from c10.store.digest import blake3_file

if TYPE_CHECKING:
    import numpy as np

    from c10.features.engines import EngineSpec

# How the ONNX is quantized besides its sample; with onnxruntime's version, part of the key of
# every INT8 engine (a new setting or quantizer rebuilds it). Only Conv/Relu/MatMul/Gemm: on the
# demo model calibrated on its own tiles, also quantizing its GeM tail (Clip, Pow, pool) gave a
# min cosine of 0.77 against fp32, without it 0.995 (figures in docs/figures.md).
QUANTIZER = {
    "tool": "onnxruntime.quantization.quantize_static", "pre_process": True, "format": "QDQ",
    "method": "MinMax", "per_channel": True, "reduce_range": False,
    "activations": "QUInt8", "weights": "QInt8", "op_types": ["Conv", "Gemm", "MatMul", "Relu"],
}
CALIBRATION_BATCH = 8
GATE_BATCH = 32
NPY_MAGIC = b"\x93NUMPY"
SAMPLE_SCHEMA = 1  # bump when the sample's choice or identity changes


def rank_tiles(tiles: list, count: int) -> list:
    """The first `count` tiles ranked by the blake3 of their z/x/y: deterministic, spread over the
    area, and chosen without reading any tile (graph loads read only the sample's bytes). A new
    tile enters the sample only if it ranks among the first `count`."""
    return heapq.nsmallest(count, tiles,
                           key=lambda t: blake3.blake3(f"{t.z}/{t.x}/{t.y}".encode()).digest())


def plan_sample(root: Path, model, tiles: list, calibration_hash: str | None,
                tile_digest: Callable[[str], str] | None = None) -> dict:
    """EngineSpec fields of an INT8 model on ONNX Runtime: its calibration tiles (none when
    `models.NAME.calibration` gives a file, whose hash is the sample's identity), its held-out
    tiles, and the sample's identity: its tiles' z/x/y and blake3 and the preprocessing.
    tile_digest(rel): a tile's blake3 (the build's hash cache: a graph load reads no tile whose
    stat is unchanged); by default each sample tile is read and hashed."""
    if tile_digest is None:
        def tile_digest(rel: str) -> str:
            return blake3_file(Path(root) / rel)

    if not model.input_size:
        raise ConfigError(f"model {model.name!r} has precision int8 but no "
                          f"models.{model.name}.input_size: its tiles cannot be preprocessed "
                          "to calibrate it", "set it, e.g. input_size = [224, 224]")
    ranked = rank_tiles(tiles, model.calibration_tiles + model.holdout_tiles)
    calibration = [] if calibration_hash else ranked[:model.calibration_tiles]
    holdout = ranked[len(calibration):len(calibration) + model.holdout_tiles]
    if calibration_hash is None:
        if not calibration:
            raise CalibrationCacheError(
                f"model {model.name!r} has precision int8 but the cache has no tiles to "
                "calibrate it on", f"import tiles first, or set models.{model.name}.calibration "
                "to an .npy of preprocessed tensors")
        calibration_hash = "tiles:" + digest({
            "schema": SAMPLE_SCHEMA, "preprocessing": model.preprocessing(),
            "tiles": [[t.z, t.x, t.y, tile_digest(t.path)] for t in calibration]})
    return {"calibration_hash": calibration_hash,
            "calibration_tiles": tuple(str(Path(root) / t.path) for t in calibration),
            "holdout_tiles": tuple(str(Path(root) / t.path) for t in holdout),
            "preprocess": (tuple(model.input_size), tuple(model.mean), tuple(model.std),
                           model.channel_order, model.resize, model.decode),
            "int8_min_cosine": model.int8_min_cosine,
            "int8_max_recall_drop": model.int8_max_recall_drop}


def check_npy(path: Path, name: str) -> None:
    """An ORT calibration file is a NumPy .npy: refused at graph load when it is not one."""
    with open(path, "rb") as fh:
        head = fh.read(len(NPY_MAGIC))
    if head != NPY_MAGIC:
        raise CalibrationCacheError(
            f"{path}: the calibration file of model {name!r} is not a NumPy .npy (ONNX Runtime "
            "calibrates on an .npy of float32 tensors [N, 3, H, W], preprocessed as tiles are)",
            f"write one with numpy.save or drop models.{name}.calibration to calibrate on tiles")


def calibration_tensors(spec: EngineSpec, data: bytes | None) -> np.ndarray:
    """The calibration batch: the .npy of `models.NAME.calibration` (checked against the
    model's input) or the sample tiles, preprocessed exactly as the build does."""
    import numpy as np

    if data is None:
        return _tile_tensors(spec, spec.calibration_tiles)
    where = f"models.{spec.model}.calibration"
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise CalibrationCacheError(f"{spec.calibration_path}: not a readable .npy ({exc})",
                                    f"regenerate it or fix {where} in c10.toml") from None
    want = tuple(spec.input_shape or array.shape[1:])
    if array.dtype != np.float32 or array.ndim != 4 or tuple(array.shape[1:]) != want \
            or len(array) == 0 or not np.isfinite(array).all():
        raise CalibrationCacheError(
            f"{spec.calibration_path}: the calibration tensors of model {spec.model!r} are "
            f"{array.dtype} {list(array.shape)}; ONNX Runtime needs finite float32 "
            f"[N >= 1, {', '.join(map(str, want))}]", f"regenerate it or fix {where} in c10.toml")
    return array


def _tile_tensors(spec: EngineSpec, paths: tuple[str, ...]) -> np.ndarray:
    import numpy as np

    from c10.features.preprocess import Preprocessing, load_tensor

    size, mean, std, order, resize, mode = spec.preprocess
    prep = Preprocessing(tuple(size), tuple(mean), tuple(std), order, resize, mode)
    out = np.empty((len(paths), *prep.shape), np.float32)
    for row, path in zip(out, paths):
        load_tensor(path, prep, row)
    return out


def compile_int8(spec: EngineSpec, data: bytes | None, out: Path,
                 optimize: Callable[[Path, Path], None], version: str) -> dict:
    """Quantize spec's ONNX on its calibration sample, `optimize(qdq, out)` it into the engine,
    and gate it against the fp32 ONNX; the sidecar's build info (settings, figures, time)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from c10.features.backends.onnxruntime import import_onnxruntime

    import_onnxruntime()  # its telemetry off before any onnxruntime module runs
    q = QUANTIZER
    calib = calibration_tensors(spec, data)
    name = _input_name(spec.onnx_path)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(batches(spec, calib))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {name: batch}

    start = time.perf_counter()
    # the system's temp dir, not the cache's: nothing of a killed quantization is left in it
    with tempfile.TemporaryDirectory(prefix="c10-int8-") as tmp:
        pre, qdq = Path(tmp) / "pre.onnx", Path(tmp) / "qdq.onnx"
        symbolic = q["pre_process"] and _pre_process(spec.onnx_path, pre)
        quantize_static(str(pre if q["pre_process"] else spec.onnx_path), str(qdq), Reader(),
                        quant_format=QuantFormat[q["format"]],
                        calibrate_method=CalibrationMethod[q["method"]],
                        per_channel=q["per_channel"], reduce_range=q["reduce_range"],
                        activation_type=QuantType[q["activations"]],
                        weight_type=QuantType[q["weights"]], op_types_to_quantize=q["op_types"])
        seconds = time.perf_counter() - start
        optimize(qdq, out)
    figures = gate(spec, outputs(session(out), spec), calib, out)
    return {"quantizer": QUANTIZER, "quantizer_version": version,
            "calibration_samples": len(calib), "calibration_s": round(seconds, 3),
            "symbolic_shape_inference": symbolic,
            "int8_gate": figures}


def gate(spec: EngineSpec, run: Callable[[np.ndarray], dict], calib: np.ndarray,
         out: Path) -> dict:
    """The INT8 engine (`run`: a batch -> its outputs by name) against the fp32 ONNX on the
    held-out tiles (the calibration tensors when there are none): a global model by its
    descriptors, a local one by the matches its features keep (c10.features.int8_local).
    EngineBuildError below a threshold, `out` removed first (a refused engine is never left to
    be moved in)."""
    held = _tile_tensors(spec, spec.holdout_tiles) if spec.holdout_tiles else calib
    fp32 = outputs(session(spec.onnx_path), spec)
    if spec.role == "local":
        from c10.features.int8_local import measure

        figures = measure(spec, fp32, run, held)
    else:
        figures = accuracy(_first(fp32(held)), _first(run(held)))
    figures["holdout"] = "held-out tiles" if spec.holdout_tiles else "calibration tensors"
    try:
        check_gate(spec, figures)
    except EngineBuildError:
        out.unlink(missing_ok=True)
        raise
    return figures


def batches(spec: EngineSpec, tensors: np.ndarray) -> list[np.ndarray]:
    """`tensors` in calibration batches no larger than the engine's batch profile (a local
    model takes one image)."""
    size = min(CALIBRATION_BATCH, spec.batch[2])
    return [tensors[i:i + size] for i in range(0, len(tensors), size)]


def accuracy(ref: np.ndarray, got: np.ndarray) -> dict:
    """INT8 outputs against fp32 ones: min cosine of their rows, and self-retrieval recall@1
    (each row's nearest neighbour in an fp32 index of the batch is itself)."""
    import numpy as np

    ref = ref.reshape(len(ref), -1).astype(np.float64)
    got = got.reshape(len(got), -1).astype(np.float64)
    ref /= np.maximum(np.linalg.norm(ref, axis=1, keepdims=True), 1e-12)
    got /= np.maximum(np.linalg.norm(got, axis=1, keepdims=True), 1e-12)
    rows = np.arange(len(ref))
    recall32 = float(((ref @ ref.T).argmax(1) == rows).mean())
    recall8 = float(((got @ ref.T).argmax(1) == rows).mean())
    return {"samples": len(ref), "min_cosine": round(float((ref * got).sum(1).min()), 6),
            "recall_at_1_fp32": round(recall32, 6), "recall_at_1": round(recall8, 6),
            "recall_at_1_drop": round(recall32 - recall8, 6)}


def check_gate(spec: EngineSpec, figures: dict) -> None:
    """EngineBuildError naming the figures and the setting that falls back, below a threshold."""
    if "match_retention" in figures:  # a local model's gate
        from c10.features.int8_local import check_retention

        return check_retention(spec, figures)
    low_cos = figures["min_cosine"] < spec.int8_min_cosine
    drop = figures["recall_at_1_drop"] > spec.int8_max_recall_drop
    if low_cos or drop:
        m = f"models.{spec.model}"
        raise EngineBuildError(
            f"the INT8 engine of model {spec.model!r} fails its accuracy gate against fp32 on "
            f"{figures['samples']} {figures.get('holdout', 'held-out tiles')}: min cosine "
            f"{figures['min_cosine']:.4f} ({m}.int8_min_cosine = {spec.int8_min_cosine}), "
            f"recall@1 drop {figures['recall_at_1_drop']:.4f} "
            f"({m}.int8_max_recall_drop = {spec.int8_max_recall_drop})",
            f"set {m}.precision = \"fp32\" in c10.toml (or relax those thresholds)")


def _pre_process(src: Path, dst: Path) -> bool:
    """onnxruntime's pre-processing (shape inference and folding first, as it advises): whether
    its symbolic shape inference ran. On the real ALIKED exports that inference fails (an Expand
    of a shape it cannot infer), so they are pre-processed without it; which one a model gets
    depends on its bytes alone (in the key), and is recorded in the sidecar."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst))
        return True
    except Exception:  # the inference's own failure, any type: retry without it
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
        return False


def _input_name(path: Path) -> str:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    weights = {init.name for init in proto.graph.initializer}
    return next(vi.name for vi in proto.graph.input if vi.name not in weights)


def session(path: Path | str):
    """A plain fp32 CPU session on an ONNX (the gate's reference, or an ORT INT8 engine)."""
    from c10.features.backends.onnxruntime import import_onnxruntime

    ort = import_onnxruntime()
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def outputs(sess, spec: EngineSpec) -> Callable[[np.ndarray], dict]:
    """run(batch) -> {output name: array} on `sess`, in calls no larger than GATE_BATCH or the
    engine's batch profile."""
    import numpy as np

    name = sess.get_inputs()[0].name
    names = [o.name for o in sess.get_outputs()]
    size = min(GATE_BATCH, spec.batch[2])

    def run(batch: np.ndarray) -> dict:
        parts = [sess.run(None, {name: batch[i:i + size]}) for i in range(0, len(batch), size)]
        return {n: np.concatenate(col) for n, col in zip(names, zip(*parts))}

    return run


def _first(named: dict):
    return next(iter(named.values()))
