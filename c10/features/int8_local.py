"""The INT8 gate of a local-feature engine: correct matches kept against fp32 features."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from c10.errors import EngineBuildError
from c10.store.digest import blake3_file

if TYPE_CHECKING:
    import numpy as np

    from c10.features.engines import EngineSpec

# Each held-out tile is paired with itself shifted by this fraction of its side (right, down;
# the uncovered strip repeats the edge): a known motion, so a match is correct when its keypoint
# in the shifted view lies within TOLERANCE_PX of where the motion puts it. Like the query's
# frames, both views go through the engine under test.
SHIFT = (1 / 8, 1 / 16)
TOLERANCE_PX = 3.0
# The query's other pairing (c10.query.rerank "mnn"), for a sector without a matcher model
MNN_MIN_COS = 0.7
OUTPUTS = ("keypoints", "descriptors", "scores")

Outputs = Callable[["np.ndarray"], dict]  # batch [1, 3, H, W] -> {output name: array}


def shifted(tensor: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """(the view of a [3, H, W] tensor moved by SHIFT, edge-padded, (dx, dy) in pixels)."""
    import numpy as np

    _, h, w = tensor.shape
    dx, dy = max(1, round(w * SHIFT[0])), max(1, round(h * SHIFT[1]))
    moved = np.pad(tensor, ((0, 0), (dy, 0), (dx, 0)), mode="edge")[:, :h, :w]
    return np.ascontiguousarray(moved), (dx, dy)


def features(outputs: dict, where: str) -> tuple[np.ndarray, ...]:
    """(keypoints [K, 2], descriptors [K, D], scores [K]) of one image's outputs."""
    import numpy as np

    missing = [n for n in OUTPUTS if n not in outputs]
    if missing:
        raise EngineBuildError(f"the local-feature model's {where} has outputs "
                               f"{sorted(outputs)}, not {list(OUTPUTS)}",
                               "export it with `c10 export-models CACHE`")
    return tuple(np.asarray(outputs[n], np.float32)[0] for n in OUTPUTS)


def matcher_pairs(matcher) -> Callable:
    """pair(f0, f1) -> (indices in f0, indices in f1) by the matcher ONNX's `matches` output
    (fed the inputs it names of kpts0, desc0, kpts1, desc1)."""
    import numpy as np

    names = [i.name for i in matcher.get_inputs()]

    def pair(f0, f1):
        feeds = {"kpts0": f0[0], "desc0": f0[1], "kpts1": f1[0], "desc1": f1[1]}
        missing = [n for n in names if n not in feeds]
        if missing:
            raise EngineBuildError(f"the matcher model takes inputs {names}; the INT8 gate "
                                   f"feeds {sorted(feeds)}",
                                   "export it with `c10 export-models CACHE`")
        out = dict(zip([o.name for o in matcher.get_outputs()],
                       matcher.run(None, {n: np.ascontiguousarray(feeds[n][None], np.float32)
                                          for n in names})))
        matches = np.asarray(out["matches"]).reshape(-1)
        keep = np.flatnonzero(matches > -1)
        return keep, matches[keep].astype(np.int64)

    return pair


def mnn_pairs(f0, f1):
    """Mutual nearest descriptors with cosine >= MNN_MIN_COS."""
    import numpy as np

    sim = f0[1] @ f1[1].T
    best, back = sim.argmax(1), sim.argmax(0)
    rows = np.arange(len(best))
    keep = np.flatnonzero((back[best] == rows) & (sim[rows, best] >= MNN_MIN_COS))
    return keep, best[keep]


def correct(f0, f1, pairs, motion: tuple[int, int]) -> tuple[int, int]:
    """(matches, correct matches) of one pair of views under the known motion."""
    import numpy as np

    i, j = pairs
    moved = f0[0][i] + np.asarray(motion, np.float32)
    error = np.linalg.norm(f1[0][j] - moved, axis=1)
    return len(i), int((error <= TOLERANCE_PX).sum())


def measure(spec: EngineSpec, fp32: Outputs, int8: Outputs, held: np.ndarray) -> dict:
    """Matches and correct matches of each held-out tile with its shifted view, fp32 features
    against INT8 ones, paired by the sector's matcher (fp32 ONNX) or, without one, by "mnn"."""
    from c10.features.int8 import session

    pair = matcher_pairs(session(spec.gate_matcher)) if spec.gate_matcher else mnn_pairs
    totals = dict.fromkeys(("matches_fp32", "correct_fp32", "matches_int8", "correct_int8"), 0)
    for tensor in held:
        moved, motion = shifted(tensor)
        for run, tag in ((fp32, "fp32"), (int8, "int8")):
            f0 = features(run(tensor[None]), f"{tag} engine")
            f1 = features(run(moved[None]), f"{tag} engine")
            found, right = correct(f0, f1, pair(f0, f1), motion)
            totals[f"matches_{tag}"] += found
            totals[f"correct_{tag}"] += right
    retention = totals["correct_int8"] / totals["correct_fp32"] if totals["correct_fp32"] else 0.0
    return {"pairs": len(held), "pairing": "lightglue" if spec.gate_matcher else "mnn",
            "matcher_blake3": blake3_file(spec.gate_matcher) if spec.gate_matcher else None,
            "shift": list(SHIFT), "tolerance_px": TOLERANCE_PX, **totals,
            "match_retention": round(retention, 6)}


def check_retention(spec: EngineSpec, figures: dict) -> None:
    """EngineBuildError naming the measured retention and the setting that falls back."""
    m = f"models.{spec.model}"
    if figures["correct_fp32"] == 0:
        raise EngineBuildError(
            f"the INT8 gate of local model {spec.model!r} cannot measure match retention: its "
            f"fp32 features give no correct match on {figures['pairs']} "
            f"{figures.get('holdout', 'held-out tiles')}", f"set {m}.precision = \"fp32\"")
    if figures["match_retention"] < spec.int8_min_match_retention:
        raise EngineBuildError(
            f"the INT8 engine of local model {spec.model!r} keeps {figures['match_retention']:.4f}"
            f" of the correct {figures['pairing']} matches of its fp32 features "
            f"({figures['correct_int8']} of {figures['correct_fp32']} on {figures['pairs']} "
            f"{figures.get('holdout', 'held-out tiles')} and their shifted views; "
            f"{m}.int8_min_match_retention = {spec.int8_min_match_retention})",
            f"set {m}.precision = \"fp32\" in c10.toml (or relax that threshold)")
