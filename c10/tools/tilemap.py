"""`c10 map DIR -o map.png`: the area per zoom, its tiles present, missing, rebuilt."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from c10.config import load_config
from c10.report import read_report
from c10.store import atomic
from c10.store.tiles import Scope, scan_tiles

PRESENT, REBUILT, MISSING = 1, 2, 3
COLORS = {0: (255, 255, 255), PRESENT: (67, 160, 71), REBUILT: (30, 136, 229),
          MISSING: (229, 57, 53)}
LABELS = {PRESENT: "present", REBUILT: "rebuilt in the last build", MISSING: "missing"}
OUTLINE, INK, GRID = (20, 20, 20), (33, 33, 33), (255, 255, 255)
MAX_PANEL, MAX_CELL = 480, 40  # px of a panel's longer side; px of one tile at most
MARGIN, LINE, RIGHT = 16, 18, 130  # RIGHT: room for the latitude labels beside a panel


@dataclass
class Panel:
    """One zoom level drawn as a grid: `k` tiles per cell side, `cell` px per cell side."""

    z: int
    x0: int
    y0: int
    nx: int
    ny: int
    k: int
    cell: int
    left: int = 0
    top: int = 0
    counts: dict[int, int] = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        return math.ceil(self.nx / self.k) * self.cell, math.ceil(self.ny / self.k) * self.cell

    def cell_center(self, x: int, y: int) -> tuple[int, int]:
        """Pixel at the centre of tile (x, y)'s cell in the whole image."""
        return (self.left + ((x - self.x0) // self.k) * self.cell + self.cell // 2,
                self.top + ((y - self.y0) // self.k) * self.cell + self.cell // 2)

    def pixel(self, lat: float, lon: float) -> tuple[float, float]:
        """Where a lat/lon falls in the image (Web Mercator, as the tiles)."""
        n = 2.0 ** self.z
        fx = (lon + 180.0) / 360.0 * n
        fy = (1.0 - math.asinh(math.tan(math.radians(lat))) / math.pi) / 2.0 * n
        scale = self.cell / self.k
        return self.left + (fx - self.x0) * scale, self.top + (fy - self.y0) * scale


@dataclass
class CoverageMap:
    image: Image.Image
    panels: dict[int, Panel]


def render_map(root: Path) -> CoverageMap:
    """Draw the cache's requested area: one panel per zoom, a legend, and the bbox in lat/lon."""
    root = Path(root)
    cfg = load_config(root)
    scope = Scope(cfg.area.bbox, cfg.area.zooms)
    present = {(t.z, t.x, t.y) for t in scan_tiles(root).tiles if t in scope}
    report = read_report(root)
    rebuilt = set(report.rebuilt_tiles) & present if report else set()
    grids = {z: _grid(z, scope.ranges[z], present, rebuilt) for z in cfg.area.zooms}
    font = _font(13)
    title = [f"c10 coverage map of {root.resolve()}  (north up)",
             f"bbox lat {cfg.area.bbox[0]:.5f}..{cfg.area.bbox[2]:.5f}, "
             f"lon {cfg.area.bbox[1]:.5f}.."
             f"{cfg.area.bbox[3]:.5f} (black outline); zooms {', '.join(map(str, cfg.area.zooms))}",
             _last_build(report)]
    width = max([p.size[0] + RIGHT for p, _ in grids.values()] + [560]) + 2 * MARGIN
    height = (MARGIN + LINE * (len(title) + 2)
              + sum(p.size[1] + LINE * 3 for p, _ in grids.values()) + MARGIN)
    image = Image.new("RGB", (width, height), COLORS[0])
    draw = ImageDraw.Draw(image)
    y = MARGIN
    for line in title:
        draw.text((MARGIN, y), line, fill=INK, font=font)
        y += LINE
    y = _legend(draw, font, y + LINE // 2, grids) + LINE // 2
    for z, (panel, cells) in grids.items():
        y = _panel(image, draw, font, panel, cells, cfg.area.bbox, y)
    return CoverageMap(image, {z: p for z, (p, _) in grids.items()})


def save_map(root: Path, out: Path) -> CoverageMap:
    """Render and write the PNG atomically."""
    result = render_map(root)
    with atomic.atomic_path(out) as tmp:
        result.image.save(tmp, format="PNG")
    return result


def _grid(z: int, ranges: tuple[int, int, int, int], present: set,
          rebuilt: set) -> tuple[Panel, np.ndarray]:
    """Cell statuses of one zoom; a cell of k x k tiles is missing if any of its tiles is."""
    x0, x1, y0, y1 = ranges
    nx, ny = x1 - x0 + 1, y1 - y0 + 1
    k = max(1, math.ceil(max(nx, ny) / MAX_PANEL))
    bw, bh = math.ceil(nx / k), math.ceil(ny / k)
    cap = np.outer(np.minimum(k, ny - np.arange(bh) * k), np.minimum(k, nx - np.arange(bw) * k))
    have = np.zeros((bh, bw), np.int64)
    fresh = np.zeros((bh, bw), bool)
    ids = np.array([(y, x) for (tz, x, y) in present if tz == z], np.int64).reshape(-1, 2)
    np.add.at(have, ((ids[:, 0] - y0) // k, (ids[:, 1] - x0) // k), 1)
    new = np.array([(y, x) for (tz, x, y) in rebuilt if tz == z], np.int64).reshape(-1, 2)
    fresh[(new[:, 0] - y0) // k, (new[:, 1] - x0) // k] = True
    cells = np.where(have < cap, MISSING, np.where(fresh, REBUILT, PRESENT)).astype(np.uint8)
    cell = 1 if k > 1 else max(1, min(MAX_CELL, MAX_PANEL // max(nx, ny)))
    counts = {PRESENT: len(ids) - len(new), REBUILT: len(new), MISSING: nx * ny - len(ids)}
    return Panel(z, x0, y0, nx, ny, k, cell, counts=counts), cells


def _legend(draw: ImageDraw.ImageDraw, font, y: int, grids: dict) -> int:
    x = MARGIN
    for code in (PRESENT, MISSING, REBUILT):
        total = sum(p.counts[code] for p, _ in grids.values())
        draw.rectangle([x, y + 2, x + 12, y + 14], fill=COLORS[code], outline=INK)
        text = f"{LABELS[code]} ({total})"
        draw.text((x + 18, y), text, fill=INK, font=font)
        x += 18 + int(draw.textlength(text, font=font)) + 22
    return y + LINE


def _panel(image: Image.Image, draw: ImageDraw.ImageDraw, font, panel: Panel, cells: np.ndarray,
           bbox: tuple[float, float, float, float], y: int) -> int:
    c = panel.counts
    draw.text((MARGIN, y), f"zoom {panel.z}: x {panel.x0}..{panel.x0 + panel.nx - 1}, "
              f"y {panel.y0}..{panel.y0 + panel.ny - 1}: "
              f"{c[PRESENT] + c[REBUILT]} of {panel.nx * panel.ny} present, "
              f"{c[MISSING]} missing, {c[REBUILT]} rebuilt"
              + (f" ({panel.k}x{panel.k} tiles per pixel)" if panel.k > 1 else ""),
              fill=INK, font=font)
    panel.left, panel.top = MARGIN, y + LINE + LINE // 2
    lut = np.array([COLORS[i] for i in range(4)], np.uint8)
    grid = Image.fromarray(lut[cells], "RGB").resize(panel.size, Image.NEAREST)
    image.paste(grid, (panel.left, panel.top))
    if panel.cell >= 8:  # tile borders, so single tiles can be counted
        w, h = panel.size
        for i in range(1, cells.shape[1]):
            draw.line([(panel.left + i * panel.cell, panel.top),
                       (panel.left + i * panel.cell, panel.top + h - 1)], fill=GRID)
        for j in range(1, cells.shape[0]):
            draw.line([(panel.left, panel.top + j * panel.cell),
                       (panel.left + w - 1, panel.top + j * panel.cell)], fill=GRID)
    _bbox(draw, font, panel, bbox)
    return panel.top + panel.size[1] + LINE + LINE // 2


def _bbox(draw: ImageDraw.ImageDraw, font, panel: Panel,
          bbox: tuple[float, float, float, float]) -> None:
    """The requested bbox as an outline, labelled with its latitudes (right) and longitudes
    (below)."""
    lat_min, lon_min, lat_max, lon_max = bbox
    (x0, y0), (x1, y1) = panel.pixel(lat_max, lon_min), panel.pixel(lat_min, lon_max)
    draw.rectangle([round(x0), round(y0), round(x1), round(y1)], outline=OUTLINE, width=2)
    right = panel.left + panel.size[0] + 6
    draw.text((right, y0 - 7), f"< lat {lat_max:.5f}", fill=INK, font=font)
    draw.text((right, y1 - 7), f"< lat {lat_min:.5f}", fill=INK, font=font)
    below = panel.top + panel.size[1] + 2
    left = f"^ lon {lon_min:.5f}"
    draw.text((x0, below), left, fill=INK, font=font)
    text = f"lon {lon_max:.5f} ^"
    at = x1 - draw.textlength(text, font=font)
    # a narrow bbox: east label after the west one
    if at < x0 + draw.textlength(left, font=font) + 12:
        text, at = f"..{lon_max:.5f} (east edge)", x0 + draw.textlength(left, font=font) + 6
    draw.text((at, below), text, fill=INK, font=font)


def _last_build(report) -> str:
    if report is None:
        return "no build report yet (.c10/report.json): nothing marked as rebuilt"
    return (f"last build: {report.outcome.value.upper()} at {report.finished_at}, "
            f"{len(report.rebuilt_tiles)} tile(s) embedded")


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()
