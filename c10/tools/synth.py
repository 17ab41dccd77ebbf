"""Synthetic satellite-like XYZ tiles (fields, roads, rivers, buildings) for demos and tests."""
from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import mercantile
import numpy as np
from PIL import Image

from c10.errors import ConfigError
from c10.store.atomic import write_bytes

PIL_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}

# Crop colours (RGB) of a late-summer patchwork: greens, wheat, ploughed soil, fallow.
CROP_COLOURS = np.array([
    (62, 92, 44), (86, 116, 52), (122, 140, 72), (188, 170, 104), (166, 142, 84),
    (122, 97, 72), (96, 78, 58), (170, 160, 128), (110, 112, 62), (198, 188, 86),
    (140, 128, 90), (74, 104, 60),
], dtype=np.float32)
ROOF_COLOURS = np.array([
    (152, 72, 56), (122, 122, 128), (82, 82, 88), (192, 186, 176), (124, 92, 70), (168, 98, 70),
], dtype=np.float32)
FOREST = np.array((46, 70, 38), dtype=np.float32)
WATER = np.array((54, 74, 88), dtype=np.float32)
SILT = np.array((98, 92, 70), dtype=np.float32)
ASPHALT = np.array((112, 112, 110), dtype=np.float32)
GARDEN = np.array((118, 120, 92), dtype=np.float32)

FIELD_CELL = 84  # px of a field block at any zoom: each zoom is its own scale-free terrain
BUILDING_CELL = 20
SHADOW = 3  # px, sun in the north-west
# Salts keep the hashed layers independent of each other.
SALTS = {name: i + 1 for i, name in enumerate((
    "warp_x", "warp_y", "field", "strip", "rows", "vroad", "hroad", "vseg", "hseg", "forest",
    "forest_tex", "village", "river", "river_mask", "house", "roof", "tint", "light",
))}

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a cheap, well-spread, platform-independent integer hash."""
    h = (h ^ (h >> np.uint64(30))) * _M1
    h = (h ^ (h >> np.uint64(27))) * _M2
    return h ^ (h >> np.uint64(31))


def _hash(key: tuple[int, int, str], *coords: np.ndarray | int) -> np.ndarray:
    """uint64 hash of integer lattice coordinates under (seed, zoom, layer)."""
    seed, zoom, layer = key
    h = _mix(np.asarray([seed * 1_000_003 + zoom * 131 + SALTS[layer]], dtype=np.uint64))
    for c in coords:
        h = _mix(h ^ (np.asarray(c, dtype=np.int64).astype(np.uint64) + _GOLD))
    return h


def _unit(h: np.ndarray) -> np.ndarray:
    """Low 24 bits of a hash as a float in [0, 1) (shift the hash first for other bits)."""
    return (h & np.uint64(0xFFFFFF)).astype(np.float32) * np.float32(2.0 ** -24)


def _cell_hash(key, cx: np.ndarray, cy: np.ndarray, depth: int = 1,
               k: np.ndarray | None = None) -> np.ndarray:
    """Per-pixel hash of integer cells, hashing only the few distinct cells of the tile once."""
    x0, y0 = int(cx.min()), int(cy.min())
    gx = np.arange(x0, int(cx.max()) + 1)
    gy = np.arange(y0, int(cy.max()) + 1)
    if depth == 1:
        return _hash(key, gx[None, :], gy[:, None])[cy - y0, cx - x0]
    table = _hash(key, gx[None, :, None], gy[:, None, None], np.arange(depth)[None, None, :])
    return table[cy - y0, cx - x0, k]


def _value_noise(key, xs: np.ndarray, ys: np.ndarray, scale: float) -> np.ndarray:
    """Smooth value noise in [0, 1) on the world-pixel grid xs × ys (separable interpolation)."""
    gx, gy = xs / scale, ys / scale
    ix, iy = np.floor(gx).astype(np.int64), np.floor(gy).astype(np.int64)
    fx, fy = (gx - ix).astype(np.float32), (gy - iy).astype(np.float32)
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    lx = np.arange(ix.min(), ix.max() + 2)
    ly = np.arange(iy.min(), iy.max() + 2)
    lattice = _unit(_hash(key, lx[None, :], ly[:, None]))
    cx = ix - lx[0]
    along_x = lattice[:, cx] * (1 - fx) + lattice[:, cx + 1] * fx
    cy = iy - ly[0]
    return along_x[cy] * (1 - fy)[:, None] + along_x[cy + 1] * fy[:, None]


def _fbm(key, xs, ys, scale: float, octaves: int = 3) -> np.ndarray:
    """Fractal sum of value noise, normalised back to [0, 1)."""
    total, weight, norm = 0.0, 1.0, 0.0
    seed, zoom, layer = key
    for octave in range(octaves):
        total = total + weight * _value_noise((seed + 7919 * octave, zoom, layer), xs, ys, scale)
        norm += weight
        scale, weight = scale / 2, weight / 2
    return total / np.float32(norm)


class _Tile:
    """Coordinates of one tile: world pixels (float64, 1-D) and in-tile pixels (float32, 2-D).

    World coordinates at z18 exceed float32 precision, so 2-D work is done on in-tile
    coordinates plus the tile's integer origin.
    """

    def __init__(self, seed: int, z: int, x: int, y: int, size: int):
        self.seed, self.z, self.size = seed, z, size
        self.x0, self.y0 = x * size, y * size
        local = np.arange(size, dtype=np.float32) + np.float32(0.5)
        self.xs, self.ys = self.x0 + local.astype(np.float64), self.y0 + local.astype(np.float64)
        self.lx, self.ly = np.meshgrid(local, local)

    def key(self, layer: str) -> tuple[int, int, str]:
        return (self.seed, self.z, layer)

    def noise(self, layer: str, scale: float, octaves: int = 1) -> np.ndarray:
        return _fbm(self.key(layer), self.xs, self.ys, scale, octaves)

    def grid(self, cell: int, dx: np.ndarray | float = 0.0, dy: np.ndarray | float = 0.0):
        """Cell index (int64) and in-cell position in [0, 1) of every pixel, for cells of `cell`
        px."""
        qx, rx = divmod(self.x0, cell)
        qy, ry = divmod(self.y0, cell)
        u = (self.lx + np.float32(rx) + dx) / np.float32(cell)
        v = (self.ly + np.float32(ry) + dy) / np.float32(cell)
        fu, fv = np.floor(u), np.floor(v)
        return fu.astype(np.int64) + qx, fv.astype(np.int64) + qy, u - fu, v - fv


def _fields(t: _Tile) -> tuple[np.ndarray, tuple]:
    """Patchwork of crop fields in a gently warped grid; returns rgb and the field grid."""
    dx = np.float32(26) * (t.noise("warp_x", 170, 2) - np.float32(0.5))
    dy = np.float32(26) * (t.noise("warp_y", 170, 2) - np.float32(0.5))
    grid = cx, cy, fx, fy = t.grid(FIELD_CELL, dx, dy)
    cell = _cell_hash(t.key("field"), cx, cy)
    strips = (cell % np.uint64(3)).astype(np.int64) + 1
    along = np.where((cell >> np.uint64(8)) & np.uint64(1), fx, fy)
    strip = np.minimum(np.floor(along * strips).astype(np.int64), 2)
    field = _cell_hash(t.key("strip"), cx, cy, 3, strip)
    rgb = CROP_COLOURS[(field % np.uint64(len(CROP_COLOURS))).astype(np.int64)]
    shade = ((np.float32(0.9) + np.float32(0.2) * _unit(field >> np.uint64(3)))
             * _row_texture(t, field))
    rgb *= shade[..., None]
    edge = np.float32(1.2 / FIELD_CELL)
    hedge = (np.minimum(fx, 1 - fx) < edge) | (np.minimum(fy, 1 - fy) < edge)
    rgb[hedge] *= np.float32(0.72)
    return rgb, grid


ROW_ANGLES = np.linspace(0, np.pi, 8, endpoint=False)
ROW_PERIODS = np.array([3.0, 4.0, 5.0, 6.0, 7.5])


def _row_texture(t: _Tile, field: np.ndarray) -> np.ndarray:
    """Brightness modulation of drill rows: per-field direction, spacing and depth."""
    a = ((field >> np.uint64(17)) % np.uint64(len(ROW_ANGLES))).astype(np.int64)
    p = ((field >> np.uint64(23)) % np.uint64(len(ROW_PERIODS))).astype(np.int64)
    cos, sin = np.cos(ROW_ANGLES)[:, None], np.sin(ROW_ANGLES)[:, None]
    # Phase of the tile origin per (angle, period), in float64 so rows continue across tiles.
    origin = np.mod((t.x0 * cos + t.y0 * sin) / ROW_PERIODS[None, :], 1.0).astype(np.float32)
    slope_x = (cos / ROW_PERIODS[None, :]).astype(np.float32)
    slope_y = (sin / ROW_PERIODS[None, :]).astype(np.float32)
    phase = origin[a, p] + t.lx * slope_x[a, p] + t.ly * slope_y[a, p]
    depth = (np.float32(0.16) * _unit(field >> np.uint64(29))
             * (_unit(field >> np.uint64(41)) > 0.25))
    return np.float32(1) + depth * np.sin(np.float32(2 * np.pi) * phase)


def _forest(t: _Tile, rgb: np.ndarray) -> np.ndarray:
    """Woods: blotchy dark-green canopy where a low-frequency mask is high; returns the mask."""
    mask = t.noise("forest", 260, 2) > 0.64
    canopy = t.noise("forest_tex", 3.5, 2)[mask]
    rgb[mask] = FOREST * (np.float32(0.6) + np.float32(0.8) * canopy)[:, None]
    return mask


def _river(t: _Tile) -> tuple[np.ndarray, np.ndarray]:
    """Meandering river as a level set of smooth noise: (water mask, bank mask)."""
    level = np.abs(t.noise("river", 420, 3) - np.float32(0.5))
    present = t.noise("river_mask", 900) > 0.45
    return (level < 0.012) & present, (level < 0.021) & present


def _roads(t: _Tile, grid: tuple) -> np.ndarray:
    """Roads along some field-grid lines, long and straight-ish, broken into segments."""
    cx, cy, fx, fy = grid
    bx, by = cx + (fx > 0.5), cy + (fy > 0.5)  # nearest grid line
    v_on = ((_unit(_cell_hash(t.key("vroad"), bx, bx * 0)) < 0.3)
            & (_unit(_cell_hash(t.key("vseg"), bx, cy)) < 0.8))
    h_on = ((_unit(_cell_hash(t.key("hroad"), by * 0, by)) < 0.3)
            & (_unit(_cell_hash(t.key("hseg"), cx, by)) < 0.8))
    half = np.float32(2.6 / FIELD_CELL)
    return (v_on & (np.minimum(fx, 1 - fx) < half)) | (h_on & (np.minimum(fy, 1 - fy) < half))


def _house_mask(t: _Tile, density: np.ndarray, shift: float = 0.0):
    """Which pixels lie on a house roof, and the house hash there (one house per 20 px cell)."""
    cx, cy, fx, fy = t.grid(BUILDING_CELL, -shift, -shift)
    h = _cell_hash(t.key("house"), cx, cy)
    w = 6 + (h % np.uint64(9)).astype(np.int64)
    d = 6 + ((h >> np.uint64(5)) % np.uint64(9)).astype(np.int64)
    ox = 1 + ((h >> np.uint64(10)) % np.uint64(4)).astype(np.int64)
    oy = 1 + ((h >> np.uint64(14)) % np.uint64(4)).astype(np.int64)
    lx, ly = fx * BUILDING_CELL - ox, fy * BUILDING_CELL - oy
    inside = (lx >= 0) & (lx < w) & (ly >= 0) & (ly < d)
    return inside & (_unit(h >> np.uint64(20)) < density), h, lx < w / 2


def _buildings(t: _Tile, rgb: np.ndarray, keep_out: np.ndarray) -> None:
    """Villages (dense clusters) and lone farms: gabled roofs with shadows to the south-east."""
    village = t.noise("village", 240, 2) > 0.62
    density = np.where(village, np.float32(0.75), np.float32(0.025))
    village &= ~keep_out
    rgb[village] = np.float32(0.55) * rgb[village] + np.float32(0.45) * GARDEN
    roof, h, half = _house_mask(t, density)
    caster, _, _ = _house_mask(t, density, SHADOW)
    roof &= ~keep_out
    rgb[caster & ~roof & ~keep_out] *= np.float32(0.45)
    colour = ROOF_COLOURS[((h[roof] >> np.uint64(24))
                           % np.uint64(len(ROOF_COLOURS))).astype(np.int64)]
    rgb[roof] = colour * np.where(half[roof], np.float32(0.82), np.float32(1.0))[:, None]


def render_tile(z: int, x: int, y: int, *, size: int = 256, seed: int = 0) -> Image.Image:
    """One synthetic aerial tile; deterministic for (seed, z, x, y, size), continuous across
    borders."""
    t = _Tile(seed, z, x, y, size)
    rgb, grid = _fields(t)
    wood = _forest(t, rgb)
    water, bank = _river(t)
    rgb[bank] = np.float32(0.5) * rgb[bank] + np.float32(0.5) * FOREST
    silt = t.noise("tint", 60)[water][:, None]
    rgb[water] = WATER * (1 - silt) + SILT * silt
    road = _roads(t, grid)
    _buildings(t, rgb, water | road | wood)
    rgb[road] = ASPHALT * (np.float32(0.92) + np.float32(0.16) * t.noise("tint", 5)[road])[:, None]
    rgb *= (np.float32(0.88) + np.float32(0.24) * t.noise("light", 400, 2))[..., None]
    rgb += _grain(seed, z, x, y, size)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


def _grain(seed: int, z: int, x: int, y: int, size: int) -> np.ndarray:
    """Sensor grain (luminance only: chroma grain costs more, figure in docs/figures.md, and JPEG
    drops it anyway)."""
    rng = np.random.default_rng([seed, z, x, y])
    return rng.standard_normal((size, size, 1), dtype=np.float32) * np.float32(4.5)


def encode(img: Image.Image, fmt: str) -> bytes:
    """Tile bytes in `fmt` (jpg, png or webp); encoders are deterministic for the same pixels."""
    buf = io.BytesIO()
    pil_format = PIL_FORMATS[fmt]
    options = {"quality": 90} if pil_format in ("JPEG", "WEBP") else {}
    img.save(buf, format=pil_format, **options)
    return buf.getvalue()


def tile_ids(bbox: tuple[float, float, float, float],
             zooms: Sequence[int]) -> list[tuple[int, int, int]]:
    """Sorted (z, x, y) of every XYZ tile touching bbox = (lat_min, lon_min, lat_max, lon_max)."""
    lat_min, lon_min, lat_max, lon_max = bbox
    if not (-85.06 <= lat_min < lat_max <= 85.06 and -180 <= lon_min < lon_max <= 180):
        raise ConfigError(
            f"bbox {bbox} is not (lat_min, lon_min, lat_max, lon_max) with min < max inside "
            "Web Mercator; fix the bbox (e.g. 50.44, 30.50, 50.46, 30.54) and rerun `c10 demo`"
        )
    tiles = mercantile.tiles(lon_min, lat_min, lon_max, lat_max, list(zooms))
    return sorted({(t.z, t.x, t.y) for t in tiles})


def make_tiles(tiles_dir: Path, bbox: tuple[float, float, float, float], zooms: Sequence[int],
               *, size: int = 256, fmt: str = "jpg", seed: int = 0) -> list[tuple[int, int, int]]:
    """Write a synthetic tile for every XYZ tile of bbox at zooms to tiles_dir/{z}/{x}/{y}.{fmt}."""
    if fmt not in PIL_FORMATS:
        raise ConfigError(f"tile format {fmt!r} is not one of {sorted(PIL_FORMATS)}; "
                          "pick one of them and rerun `c10 demo`")
    ids = tile_ids(bbox, zooms)

    def render(tile: tuple[int, int, int]) -> bytes:
        return encode(render_tile(*tile, size=size, seed=seed), fmt)

    # numpy and the encoders release the GIL for most of a tile, so threads use both cores.
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for start in range(0, len(ids), 256):  # chunks bound the encoded bytes held in memory
            chunk = ids[start:start + 256]
            for (z, x, y), data in zip(chunk, pool.map(render, chunk)):
                write_bytes(Path(tiles_dir) / str(z) / str(x) / f"{y}.{fmt}", data)
    return ids


# Bounds of a camera-like view: minimum kept side, maximum rotation, brightness/contrast swing.
