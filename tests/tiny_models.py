"""Tiny ONNX models for the engine tests, built with onnx.helper (no tests in this module)."""
from __future__ import annotations

from pathlib import Path

import blake3
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# onnx 1.23 writes IR 14 by default; onnxruntime 1.31 reads at most 13 (1.32 reads 14).
IR_VERSION = 10


def tiny_cnn(path: Path, size: int = 32, dim: int = 16, seed: int = 0,
             widths: tuple[int, ...] = (8, 16)) -> Path:
    """A conv/relu stack, global pool and projection with a dynamic batch:
    [N,3,size,size] -> [N,dim]."""
    rng = np.random.default_rng(seed)
    nodes, weights, x, cin = [], [], "image", 3
    for i, width in enumerate(widths):
        w = (rng.standard_normal((width, cin, 3, 3)) * np.sqrt(2 / (cin * 9))).astype(np.float32)
        b = (rng.standard_normal(width) * 0.1).astype(np.float32)
        weights += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], kernel_shape=[3, 3],
                                   pads=[1, 1, 1, 1], strides=[2, 2]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        x, cin = f"r{i}", width
    proj = (rng.standard_normal((cin, dim)) / np.sqrt(cin)).astype(np.float32)
    weights.append(numpy_helper.from_array(proj, "proj"))
    nodes += [helper.make_node("GlobalAveragePool", [x], ["pool"]),
              helper.make_node("Flatten", ["pool"], ["flat"], axis=1),
              helper.make_node("MatMul", ["flat", "proj"], ["descriptor"])]
    graph = helper.make_graph(
        nodes, "tiny_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("descriptor", TensorProto.FLOAT, ["batch", dim])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def file_hash(path: Path) -> str:
    return blake3.blake3(Path(path).read_bytes()).hexdigest()


def reference(path: Path, batch: np.ndarray) -> np.ndarray:
    """A plain fp32 onnxruntime session on the source ONNX."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: batch})[0]


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def images(n: int, size: int = 32, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


def spec_for(path: Path, **kw):
    """An EngineSpec of the tiny CNN at `path` (32x32 input unless overridden)."""
    from c10.features.engines import EngineSpec

    kw.setdefault("input_shape", (3, 32, 32))
    return EngineSpec(model="global", onnx_path=path, onnx_hash=file_hash(path), **kw)
