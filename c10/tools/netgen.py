"""Small seeded ONNX networks for the demo: global descriptor CNN, local features, matcher."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from c10.errors import ModelError
from c10.store.atomic import write_bytes

# onnx 1.23 writes IR 14 by default; onnxruntime 1.31 reads at most IR 13 (DESIGN.md).
IR_VERSION = 10
OPSET = 17  # every op used here is unchanged up to 17 and runs in onnxruntime and OpenVINO
PRODUCER = "c10.netgen"
# The networks expect RGB in [0, 1] normalised with the ImageNet statistics, NCHW.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
GLOBAL_STAGES = (48, 96, 160)  # widths between the Gabor stem and the final `dim` stage
GEM_P = 3.0
CARRY_RANDOM = 0.5  # weight of the random part against the pass-through in the global CNN
MATCH_THRESHOLD = 0.1  # dual-softmax probability below which a mutual match is dropped


class _Graph:
    """Accumulates nodes and initializers under unique, deterministic names."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, hint: str, value) -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, *inputs: str, outputs: int = 1, out: str | None = None, **attrs):
        names = [out] if out else [self.name(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names

    def conv(self, x: str, weight: np.ndarray, stride: int = 1) -> str:
        k = weight.shape[-1]
        w = self.const("w", weight.astype(np.float32))
        return self.op("Conv", x, w, kernel_shape=[k, k], strides=[stride, stride],
                       pads=[k // 2] * 4)

    def he(self, c_out: int, c_in: int, k: int = 3) -> np.ndarray:
        """He-normal weights, each filter made zero-mean so flat regions give no response."""
        w = self.rng.standard_normal((c_out, c_in, k, k)) * math.sqrt(2.0 / (c_in * k * k))
        return w - w.mean(axis=(1, 2, 3), keepdims=True)

    def carry(self, c_out: int, c_in: int, stride: int) -> np.ndarray:
        """Random 3x3 weights plus a pass-through of the input channels (blurred when striding),
        so the stem's oriented-texture and colour evidence reaches the pooled descriptor."""
        w = CARRY_RANDOM * self.he(c_out, c_in)
        passthrough = np.outer([1, 2, 1], [1, 2, 1]) / 16 if stride == 2 else np.pad([[1.0]], 1)
        for i in range(min(c_in, c_out)):
            w[i, i] += passthrough
        return w

    def model(self, inputs, outputs, graph_name: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name=PRODUCER)
        model.ir_version = IR_VERSION
        return model


def _save(model: onnx.ModelProto, path) -> Path:
    """Check `model` and write it atomically to `path`."""
    path = Path(path)
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ModelError(f"generated network {model.graph.name} for {path} fails onnx.checker: "
                         f"{exc}; this is a c10 bug, report it with `c10 --version`") from exc
    write_bytes(path, model.SerializeToString())
    return path


def gabor_bank(size: int = 7) -> np.ndarray:
    """Fixed first layer [40, 3, k, k]: oriented Gabors (2 scales, 4 angles, even/odd, ±) on
    luminance and colour-opponent blobs (red-green, blue-yellow, 2 scales, ±)."""
    r = np.arange(size) - size // 2
    yy, xx = np.meshgrid(r, r, indexing="ij")
    luma = np.full(3, 1 / 3)
    filters = []
    for sigma in (1.0, 2.0):
        for theta in np.arange(4) * np.pi / 4:
            u = xx * np.cos(theta) + yy * np.sin(theta)
            v = -xx * np.sin(theta) + yy * np.cos(theta)
            envelope = np.exp(-(u**2 + 0.5 * v**2) / (2 * sigma**2))
            for phase in (0.0, np.pi / 2):
                g = envelope * np.cos(2 * np.pi * u / (3 * sigma) + phase)
                g = (g - g.mean()) / np.linalg.norm(g - g.mean())
                filters += [luma[:, None, None] * g, -luma[:, None, None] * g]
    for sigma in (1.5, 3.0):
        blob = np.exp(-(xx**2 + yy**2) / (2 * sigma**2))
        blob /= np.linalg.norm(blob)
        for colour in (np.array([1.0, -1.0, 0.0]) / math.sqrt(2),
                       np.array([-0.5, -0.5, 1.0]) / math.sqrt(1.5)):
            filters += [colour[:, None, None] * blob, -colour[:, None, None] * blob]
    return np.stack(filters).astype(np.float32)


def _image_input(name: str, batch: str | int, size: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch, 3, size, size])


def write_global_model(path, *, input_size: int = 224, dim: int = 256, seed: int = 0) -> Path:
    """DINOv2-sized stand-in: Gabor stem, 4 stride-2 stages of 3x3 convs, GeM (p=3), L2 norm.

    `image` [batch, 3, input_size, input_size] -> `descriptor` [batch, dim] (unit L2 norm).
    """
    g = _Graph(seed)
    stem = gabor_bank()
    x = g.op("Relu", g.conv("image", stem, stride=2))
    channels = stem.shape[0]
    for width in (*GLOBAL_STAGES, dim):
        x = g.op("Relu", g.conv(x, g.carry(width, channels, 2), stride=2))
        x = g.op("Relu", g.conv(x, g.carry(width, width, 1)))
        channels = width
    x = _gem(g, x)
    g.op("LpNormalization", x, out="descriptor", axis=1, p=2)
    out = helper.make_tensor_value_info("descriptor", TensorProto.FLOAT, ["batch", dim])
    return _save(g.model([_image_input("image", "batch", input_size)], [out], "c10_global"), path)


def _gem(g: _Graph, x: str) -> str:
    """Generalised-mean pooling: (mean over pixels of clip(x, eps)^p)^(1/p), flattened."""
    x = g.op("Clip", x, g.const("eps", np.float32(1e-6)))
    x = g.op("Pow", x, g.const("p", np.float32(GEM_P)))
    x = g.op("GlobalAveragePool", x)
    x = g.op("Pow", x, g.const("inv_p", np.float32(1 / GEM_P)))
    return g.op("Flatten", x, axis=1)


def write_local_model(path, *, input_size: int = 256, keypoints: int = 256, desc_dim: int = 64,
                      seed: int = 1) -> Path:
    """ALIKED stand-in: `image` [1, 3, S, S] -> `keypoints` [1, K, 2] (x, y pixels),
    `descriptors` [1, K, desc_dim] (unit norm, from a stride-4 map) and `scores` [1, K]."""
    g = _Graph(seed)
    s, k = input_size, keypoints
    score = _score_map(g, "image", s)
    values, index = g.op("TopK", g.op("Reshape", score, g.const("flat", np.array([1, s * s]))),
                         g.const("k", np.array([k])), outputs=2, axis=1)
    px = g.op("Mod", index, g.const("w", np.array(s)))
    py = g.op("Div", index, g.const("w", np.array(s)))
    xy = [g.op("Unsqueeze", g.op("Cast", c, to=TensorProto.FLOAT), g.const("ax", np.array([2])))
          for c in (px, py)]
    g.op("Concat", *xy, out="keypoints", axis=2)
    g.op("Sigmoid", values, out="scores")
    _descriptors_at(g, "image", px, py, s, k, desc_dim)
    outputs = [helper.make_tensor_value_info("keypoints", TensorProto.FLOAT, [1, k, 2]),
               helper.make_tensor_value_info("descriptors", TensorProto.FLOAT, [1, k, desc_dim]),
               helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, k])]
    return _save(g.model([_image_input("image", 1, s)], outputs, "c10_local"), path)


def _score_map(g: _Graph, image: str, size: int) -> str:
    """Corner-ish score: energy of the Gabor bank, non-maximum suppressed, borders zeroed."""
    energy = g.op("Relu", g.conv(image, gabor_bank(5)[:32]))
    weight = np.full((1, 32, 1, 1), 1 / 32, dtype=np.float32)
    score = g.op("Conv", energy, g.const("w", weight), kernel_shape=[1, 1])
    border = np.zeros((1, 1, size, size), dtype=np.float32)
    border[..., 8:-8, 8:-8] = 1  # keypoints need a full descriptor window
    score = g.op("Mul", score, g.const("border", border))
    peak = g.op("MaxPool", score, kernel_shape=[5, 5], strides=[1, 1], pads=[2, 2, 2, 2])
    is_peak = g.op("Cast", g.op("Equal", score, peak), to=TensorProto.FLOAT)
    return g.op("Mul", score, is_peak)


def _descriptors_at(g: _Graph, image: str, px: str, py: str, size: int, k: int, dim: int) -> None:
    """Dense descriptors at stride 4, gathered at each keypoint's cell and L2-normalised."""
    x = g.op("Relu", g.conv(image, g.he(32, 3), stride=2))
    x = g.conv(x, g.he(dim, 32), stride=2)
    cells = size // 4
    x = g.op("Reshape", x, g.const("flat", np.array([1, dim, cells * cells])))
    four = g.const("four", np.array(4))
    row = g.op("Mul", g.op("Div", py, four), g.const("cells", np.array(cells)))
    cell = g.op("Reshape", g.op("Add", row, g.op("Div", px, four)), g.const("k", np.array([k])))
    x = g.op("Transpose", g.op("Gather", x, cell, axis=2), perm=[0, 2, 1])
    g.op("LpNormalization", x, out="descriptors", axis=2, p=2)


def write_matcher_model(path, *, keypoints: int = 256, desc_dim: int = 64, seed: int = 2) -> Path:
    """LightGlue stand-in: `desc0`, `desc1` [1, K, D] -> `matches` [1, K] int64 (index in desc1
    of each mutual best match, -1 if none) and `scores` [1, K] (dual-softmax probability)."""
    g = _Graph(seed)
    k, d = keypoints, desc_dim
    w_in = g.const("w_in", (g.rng.standard_normal((d, d)) * 0.1 / math.sqrt(d)).astype(np.float32))
    w_out = g.const("w_out",
                    (g.rng.standard_normal((d, d)) * 0.1 / math.sqrt(d)).astype(np.float32))
    p0, p1 = (g.op("Add", x, g.op("MatMul", x, w_in)) for x in ("desc0", "desc1"))
    m0 = _cross_attend(g, p0, p1, w_out, d)
    m1 = _cross_attend(g, p1, p0, w_out, d)
    m0, m1 = (g.op("LpNormalization", m, axis=2, p=2) for m in (m0, m1))
    sim = g.op("Mul", g.op("MatMul", m0, g.op("Transpose", m1, perm=[0, 2, 1])),
               g.const("inv_t", np.float32(10.0)))
    prob = g.op("Mul", g.op("Softmax", sim, axis=2), g.op("Softmax", sim, axis=1))
    _mutual_matches(g, prob, k)
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, k, d])
              for n in ("desc0", "desc1")]
    outputs = [helper.make_tensor_value_info("matches", TensorProto.INT64, [1, k]),
               helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, k])]
    return _save(g.model(inputs, outputs, "c10_matcher"), path)


def _cross_attend(g: _Graph, q: str, kv: str, w_out: str, d: int) -> str:
    """q + softmax(q kvᵀ / √d) kv W: symmetric, so a set matched with itself stays itself."""
    logits = g.op("Mul", g.op("MatMul", q, g.op("Transpose", kv, perm=[0, 2, 1])),
                  g.const("scale", np.float32(1 / math.sqrt(d))))
    attended = g.op("MatMul", g.op("Softmax", logits, axis=2), kv)
    return g.op("Add", q, g.op("MatMul", attended, w_out))


def _mutual_matches(g: _Graph, prob: str, k: str) -> None:
    """Keep i -> j only if j's best is i too and the probability clears MATCH_THRESHOLD."""
    best_j = g.op("ArgMax", prob, axis=2, keepdims=0)
    best_i = g.op("ArgMax", prob, axis=1, keepdims=0)
    score = g.op("ReduceMax", prob, axes=[2], keepdims=0)
    back = g.op("GatherElements", best_i, best_j, axis=1)
    mutual = g.op("Equal", back, g.const("rows", np.arange(k, dtype=np.int64)[None, :]))
    keep = g.op("And", mutual, g.op("Greater", score, g.const("thr", np.float32(MATCH_THRESHOLD))))
    g.op("Where", keep, best_j, g.const("none", np.array(-1, dtype=np.int64)), out="matches")
    g.op("Where", keep, score, g.const("zero", np.float32(0.0)), out="scores")


def write_demo_models(models_dir: Path, *, global_input_size: int = 224) -> dict[str, Path]:
    """Write global.onnx, local.onnx and matcher.onnx under models_dir; returns name -> path."""
    models_dir = Path(models_dir)
    return {
        "global": write_global_model(models_dir / "global.onnx", input_size=global_input_size),
        "local": write_local_model(models_dir / "local.onnx"),
        "matcher": write_matcher_model(models_dir / "matcher.onnx"),
    }
