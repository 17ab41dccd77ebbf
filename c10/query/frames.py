"""Camera-like frames cut from a cache's own mosaic, and the selftest that localizes them."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

from c10.errors import ConfigError, IndexBuildError
from c10.query.geo import distance_m, tile_latlon, tile_size_m
from c10.store.tiles import TileId

# A frame: centred anywhere on a tile, its rotated square within one tile's span on each axis
# (so it touches 1 to 4 tiles), covering SIDE of the largest side that fits at its rotation.
DEGREES = 10.0        # rotation drawn in [-DEGREES, DEGREES]
SWING = 0.2           # brightness gain drawn in [1 - SWING, 1 + SWING], contrast likewise / 2
SIDE = (0.75, 1.0)    # share of the largest fitting side
TRIES = 50            # centres tried per frame before giving up on finding all its tiles


@dataclass(frozen=True)
class Frame:
    image: Image.Image
    z: int
    x: float          # the frame centre in tile units at zoom z
    y: float
    heading: float    # degrees clockwise from north of the frame's top edge
    side: float       # the frame's side in tiles

    @property
    def tile(self) -> TileId:
        """The tile under the frame's centre."""
        return TileId(self.z, math.floor(self.x), math.floor(self.y))

    @property
    def latlon(self) -> tuple[float, float]:
        return tile_latlon(self.z, self.x, self.y)


def cut_frame(load: Callable[[TileId], Image.Image], listed, rng: np.random.Generator,
              tile: TileId, degrees: float = DEGREES, swing: float = SWING) -> Frame | None:
    """A frame centred at a random point of `tile`, from the mosaic of the tiles it covers (each
    read with `load`), rotated and brightness-shifted; None if no centre tried has all of its
    tiles in `listed` (the area's edge)."""
    for _ in range(TRIES):
        theta = rng.uniform(-degrees, degrees)
        cos, sin = abs(math.cos(math.radians(theta))), abs(math.sin(math.radians(theta)))
        side = rng.uniform(*SIDE) / (cos + sin)
        cx, cy = tile.x + rng.uniform(0, 1), tile.y + rng.uniform(0, 1)
        if all(c in listed for c in frame_tiles(tile.z, cx, cy, side, theta)):
            image = render(load, tile.z, cx, cy, side, theta)
            return Frame(_light(image, rng, swing), tile.z, cx, cy, theta % 360.0, side)
    return None


def frame_tiles(z: int, cx: float, cy: float, side: float, theta: float) -> list[TileId]:
    """The tiles under a frame's rotated square (its bounding box), row by row."""
    rad = math.radians(theta)
    half = side * (abs(math.cos(rad)) + abs(math.sin(rad))) / 2
    return [TileId(z, x, y) for y in range(math.floor(cy - half), math.ceil(cy + half))
            for x in range(math.floor(cx - half), math.ceil(cx + half))]


def render(load: Callable[[TileId], Image.Image], z: int, cx: float, cy: float, side: float,
           theta: float) -> Image.Image:
    """The frame of `side` tiles centred on (cx, cy) (tile units), its top edge heading `theta`
    degrees clockwise from north, at one tile's pixel size, from the mosaic of the (at most 2x2)
    tiles it covers."""
    cells = frame_tiles(z, cx, cy, side, theta)
    if len({c.x for c in cells}) > 2 or len({c.y for c in cells}) > 2:
        raise ConfigError(f"a frame of {side:.3f} tiles at {theta:.1f} degrees spans more than "
                          "2x2 tiles", "make it smaller")
    first = load(cells[0])
    px = first.size[0]
    x0, y0 = cells[0].x, cells[0].y
    mosaic = Image.new("RGB", (2 * px, 2 * px))
    for c in cells:
        img = first if c == cells[0] else load(c)
        img = img if img.size == (px, px) else img.resize((px, px), Image.Resampling.BILINEAR)
        mosaic.paste(img.convert("RGB"), ((c.x - x0) * px, (c.y - y0) * px))
    cx, cy = (cx - x0) * px, (cy - y0) * px
    s = side  # mosaic pixels per output pixel (the output is px wide, the frame side * px)
    rad = math.radians(theta)
    # output (u, v) -> mosaic: centre + R(theta) * s * ((u, v) - output centre), the camera's
    # heading theta clockwise from north (y grows southwards in both)
    a, b, d, e = s * math.cos(rad), -s * math.sin(rad), s * math.sin(rad), s * math.cos(rad)
    c = cx - a * px / 2 - b * px / 2
    f = cy - d * px / 2 - e * px / 2  # Pillow samples output pixel centres: (u + 0.5, v + 0.5)
    return mosaic.transform((px, px), Image.Transform.AFFINE, (a, b, c, d, e, f),
                            Image.Resampling.BILINEAR)


def _light(image: Image.Image, rng: np.random.Generator, swing: float) -> Image.Image:
    arr = np.asarray(image, np.float32)
    gain = 1 + rng.uniform(-swing, swing)
    contrast = 1 + rng.uniform(-swing, swing) / 2
    mean = arr.mean(axis=(0, 1))
    arr = (arr - mean) * contrast + mean * gain
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


@dataclass(frozen=True)
class FramesResult:
    n: int
    seed: int
    degrees: float
    k: int                     # candidates re-ranked (0: retrieval only)
    recall_at_1: float
    recall_at_5: float
    position_error_m_median: float | None
    position_error_m_p90: float | None
    position_error_tiles_median: float | None
    heading_error_deg_median: float | None
    located: float | None      # share of frames a model fitted a position to (None: no re-rank)
    position_source: str       # "fit" (the re-rank's), or "footprint" (the top-1's centre)
    tile_size_m: float         # median over the frames of their zoom's tile side at their lat
    confidence_median_hit: float | None
    confidence_median_miss: float | None
    misses: list               # [z, x, y] of the frames' centre tiles whose top-1 missed

    def to_json(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def frames_selftest(searcher, load: Callable[[TileId], Image.Image], n: int = 100, seed: int = 0,
                    reranker=None, k: int = 10, degrees: float = DEGREES) -> FramesResult:
    """Localize n seeded frames (cut_frame) by retrieval, and by re-ranking the top k when a
    reranker is given. A hit: a candidate whose footprint holds the frame's centre (for tile
    rows, the tile under it). Position: the re-rank's fitted centre; retrieval alone, the top-1
    footprint's centre."""
    if degrees < 0 or degrees > 45:
        raise ConfigError(f"--degrees {degrees:g}: a frame's rotation is drawn within +-DEGREES",
                          "give --degrees between 0 and 45 (a larger turn no longer fits four "
                          "tiles)")
    rng = np.random.default_rng(seed)
    known = searcher.listed_tiles()
    if not known:
        raise IndexBuildError("no indexed tile is listed in the Manifest",
                              then="rebuild the cache with `doit build_cache`")
    listed = set(searcher.paths)
    frames = []
    for i in rng.permutation(len(known)):
        if len(frames) >= n:
            break
        frame = cut_frame(load, listed, rng, known[i], degrees)
        if frame is not None:
            frames.append(frame)
    if not frames:
        raise IndexBuildError("no tile has all its neighbours in the cache to cut frames from",
                              then="widen area.bbox and rebuild with `doit build_cache`")
    want = max(5, k) if reranker is not None else 5
    found = searcher.search(searcher.embed([f.image for f in frames]), want)
    rows = []
    for frame, hits in zip(frames, found):
        verified = (reranker.verify(frame.image, hits[:k], searcher.div)
                    if reranker is not None else None)
        rows.append(_score(frame, hits, verified, k))
    return _summary(frames, rows, seed, degrees, k if reranker is not None else 0)


def _score(frame: Frame, hits, verified, k: int):
    """(hit@1, hit@5, error m, error tiles, heading error, confidence) of one frame."""
    order = hits if verified is None else [v.hit for v in verified.ranked] + list(hits[k:])
    holds = [h.holds(frame.z, frame.x, frame.y) for h in order]
    pos = verified.position if verified is not None else None
    where = tiles = heading = None
    if verified is None:
        top = order[0]
        where = (top.lat, top.lon)
        if top.z == frame.z:
            tiles = math.hypot(top.fx + 0.5 - frame.x, top.fy + 0.5 - frame.y)
    elif pos is not None:
        where = (pos.lat, pos.lon)
        if pos.z == frame.z:
            tiles = math.hypot(pos.x - frame.x, pos.y - frame.y)
        heading = abs((pos.heading - frame.heading + 180) % 360 - 180)
    error = distance_m(frame.latlon, where) if where is not None else None
    return (holds[0], any(holds[:5]), error, tiles, heading,
            pos.confidence if pos is not None else None)


def _summary(frames, rows, seed, degrees, k) -> FramesResult:
    def median(values):
        values = [v for v in values if v is not None]
        return round(float(np.median(values)), 3) if values else None

    def p90(values):
        values = [v for v in values if v is not None]
        return round(float(np.percentile(values, 90)), 3) if values else None

    at1, at5, errors, tiles, headings, conf = zip(*rows)
    sizes = [tile_size_m(f.z, f.latlon[0]) for f in frames]
    return FramesResult(
        len(frames), seed, degrees, k, round(float(np.mean(at1)), 4), round(float(np.mean(at5)), 4),
        median(errors), p90(errors), median(tiles), median(headings),
        round(sum(e is not None for e in errors) / len(frames), 4) if k else None,
        "fit" if k else "footprint",
        round(float(np.median(sizes)), 1),
        median([c for c, ok in zip(conf, at1) if ok]),
        median([c for c, ok in zip(conf, at1) if not ok]),
        [list(f.tile) for f, ok in zip(frames, at1) if not ok])
