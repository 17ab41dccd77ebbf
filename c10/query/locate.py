"""Where a frame is: a RANSAC similarity from frame pixels to tile coordinates, as a position."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from c10.query.geo import tile_latlon, tile_size_m

# Why a similarity (cv2.estimateAffinePartial2D: rotation, one scale, shift; 4 degrees of freedom)
# and not a homography (8): the camera looks down at flat ground from far above, so a frame is
# the map up to rotation, scale and shift, and the few extra perspective pixels a homography
# would model cost more than they give. A similarity needs 2 matches per RANSAC sample, not 4
# (far fewer trials to draw an all-inlier sample when most matches of a wrong candidate are
# wrong), cannot fold or mirror the frame, cannot overfit the 10-30 inliers a frame that only
# partly overlaps a tile gives, and its rotation and scale are the heading and the scale asked for.
# OpenCV: the solver of record, installed already (wheels for every platform we fly), a
# deterministic RANSAC (fixed RNG seed per call) with a Levenberg-Marquardt refit on the inliers.
REPROJ = 0.02        # RANSAC inlier threshold, a share of the local model's input side (~5 px)
MIN_INLIERS = 12     # fewer: no model (the least a pairing may ask: c10.query.rerank.MIN_INLIERS)
SCALE_RANGE = (0.1, 10.0)  # frame width in tiles outside this: a degenerate fit, refused
AGREE = 0.25         # fits whose frame centres lie this close (tiles) describe the same place
HALF_STRENGTH = 20   # inliers at which the count alone gives confidence 0.5
RANSAC_ITERS = 2000


@dataclass(frozen=True)
class Fit:
    """A similarity from frame pixels (continuous: pixel edges on integers) to tile units at
    zoom z: tile = a @ frame + t."""

    z: int
    a: np.ndarray            # (2, 2)
    t: np.ndarray            # (2,)
    inliers: int
    mask: np.ndarray         # (N,) bool, over the correspondences it was fitted on
    src: np.ndarray          # (N, 2) frame pixels
    dst: np.ndarray          # (N, 2) tile units
    side_px: float           # candidate pixels per tile unit the threshold was applied in
    min_inliers: int = MIN_INLIERS

    def apply(self, pts: np.ndarray) -> np.ndarray:
        return np.asarray(pts, np.float64) @ self.a.T + self.t

    @property
    def scale(self) -> float:
        """Tile units per frame pixel."""
        return math.sqrt(abs(float(np.linalg.det(self.a))))

    @property
    def heading(self) -> float:
        """Degrees clockwise from north of the frame's up direction, in [0, 360)."""
        # frame up (0, -1) lands on s * (sin h, -cos h) in (east, south): h = atan2(a10, a00)
        return math.degrees(math.atan2(self.a[1, 0], self.a[0, 0])) % 360.0


@dataclass(frozen=True)
class Position:
    """A frame's centre on the map, from the fit of its best candidate."""

    lat: float
    lon: float
    heading: float       # degrees clockwise from north of the frame's top edge
    scale: float         # the frame's width in tiles of zoom z (1: the frame spans one tile)
    m_per_px: float      # ground metres per frame pixel
    inliers: int
    confidence: float    # in [0, 1]: inlier count and the margin over a fit elsewhere
    z: int
    x: float             # the centre in tile units at zoom z
    y: float

    def to_json(self) -> dict:
        return asdict(self)


def fit_similarity(z: int, src: np.ndarray, dst: np.ndarray, origin: Sequence[float],
                   side_px: float, min_inliers: int = MIN_INLIERS) -> Fit | None:
    """RANSAC similarity from frame pixels `src` to tile units `dst` (N, 2), or None if fewer than
    min_inliers agree or the fit is degenerate. The solver runs in pixels of the candidate (tile
    units less `origin`, times `side_px`), where the threshold has a meaning and float32 keeps
    its precision (tile coordinates at z16 are ~40 000)."""
    import cv2

    if len(src) < min_inliers:
        return None
    origin = np.asarray(origin, np.float64)
    local = (np.asarray(dst, np.float64) - origin) * side_px
    m, mask = cv2.estimateAffinePartial2D(
        np.asarray(src, np.float32), local.astype(np.float32), method=cv2.RANSAC,
        ransacReprojThreshold=REPROJ * side_px, maxIters=RANSAC_ITERS, confidence=0.999)
    if m is None or mask is None:
        return None
    mask = mask.ravel().astype(bool)
    if int(mask.sum()) < min_inliers:
        return None
    a = m[:, :2].astype(np.float64) / side_px
    t = m[:, 2].astype(np.float64) / side_px + origin
    return Fit(z, a, t, int(mask.sum()), mask, np.asarray(src, np.float64),
               np.asarray(dst, np.float64), float(side_px), min_inliers)


def plausible(fit: Fit, frame_size: tuple[int, int]) -> bool:
    """A frame that spans between a tenth of a tile and ten tiles (anything else is a collapse)."""
    width = fit.scale * frame_size[0]
    return SCALE_RANGE[0] <= width <= SCALE_RANGE[1]


def centre_of(fit: Fit, frame_size: tuple[int, int]) -> np.ndarray:
    w, h = frame_size
    return fit.apply(np.array([[w / 2.0, h / 2.0]]))[0]


def fuse(fits: Sequence[Fit], best: Fit, frame_size: tuple[int, int]) -> Fit:
    """One fit over the inliers of every fit that puts the frame where `best` does: a frame spans
    up to four tiles, and each candidate holds the matches of its own part of it."""
    here = centre_of(best, frame_size)
    same = [f for f in fits if f.z == best.z
            and np.hypot(*(centre_of(f, frame_size) - here)) <= AGREE]
    if len(same) < 2:
        return best
    pairs = np.concatenate([np.hstack([f.src[f.mask], f.dst[f.mask]]) for f in same])
    pairs = np.unique(np.round(pairs, 4), axis=0)  # overlapping windows share tile keypoints
    fused = fit_similarity(best.z, pairs[:, :2], pairs[:, 2:], np.floor(here), best.side_px,
                           best.min_inliers)
    if fused is None or not plausible(fused, frame_size) or fused.inliers < best.inliers:
        return best
    return fused


def position(best: Fit, fits: Sequence[Fit], frame_size: tuple[int, int]) -> Position:
    """The frame centre through `best`, with its heading, scale and a confidence: the inlier count
    saturating, times the margin over the strongest fit that puts the frame elsewhere."""
    x, y = centre_of(best, frame_size)
    lat, lon = tile_latlon(best.z, x, y)
    here = np.array([x, y])
    # a fit at another zoom that puts the frame here agrees too: compare in best's tile units
    rival = max((f.inliers for f in fits if np.hypot(*(centre_of(f, frame_size)
                                                      * 2.0 ** (best.z - f.z) - here)) > 2 * AGREE),
                default=0)
    strength = best.inliers / (best.inliers + HALF_STRENGTH)
    margin = max(0.0, 1.0 - rival / best.inliers)
    tiles_per_px = best.scale
    return Position(round(lat, 7), round(lon, 7), round(best.heading, 2),
                    round(tiles_per_px * frame_size[0], 4),
                    round(tiles_per_px * tile_size_m(best.z, lat), 4), best.inliers,
                    round(strength * margin, 3), best.z, round(float(x), 6), round(float(y), 6))
