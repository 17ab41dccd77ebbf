"""Retrieval windows: tile-sized cuts of the tile mosaic at 1/div-tile offsets, and their rows."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from c10.features.descriptor_store import Reuse
from c10.features.embedding import embed_tiles
from c10.features.preprocess import Preprocessing, decode, to_tensor
from c10.features.shards import DESCRIPTORS, ShardStats, TileRecord, build_shard
from c10.features.window_grid import Window, window_key
from c10.store.tiles import Tile

# Which windows exist and how their rows are keyed: c10.features.window_grid (light: the graph
# loads it on every build).


def window_pixels(window: Window, div: int, pixels: Callable[[Tile], np.ndarray]) -> np.ndarray:
    """The window's (H, W, 3) uint8 pixels, H x W the size of its top-left tile (a covered tile of
    another size is resized to it first): the mosaic cut at the window's offset, rounded down to a
    pixel."""
    ox, oy = window.x % div, window.y % div
    parts = [pixels(t) for t in window.tiles]
    h, w = parts[0].shape[:2]
    parts = [p if p.shape[:2] == (h, w) else
             np.asarray(Image.fromarray(p, "RGB").resize((w, h), Image.BILINEAR)) for p in parts]
    top, left = oy * h // div, ox * w // div
    out = np.empty((h, w, 3), np.uint8)
    cols = 2 if ox else 1
    for i, part in enumerate(parts):  # paste each tile's share of the window straight into it
        r, c = divmod(i, cols)
        y0, x0 = r * h - top, c * w - left        # the tile's corner in window coordinates
        ys, xs = slice(max(y0, 0), min(y0 + h, h)), slice(max(x0, 0), min(x0 + w, w))
        out[ys, xs] = part[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
    return out


class TilePixels:
    """Decoded tiles of one window shard: a tile lies in up to (2 div - 1)² - 1 windows, it is
    decoded once (the block's tiles and the next column and row, kept until the shard is
    written)."""

    def __init__(self, root: Path, prep: Preprocessing | None = None):
        self.root, self.prep, self._cache, self._lock = Path(root), prep, {}, threading.Lock()

    def __call__(self, tile: Tile) -> np.ndarray:
        got = self._cache.get(tile.path)
        if got is None:
            # (a thread racing on the same tile decodes twice)
            got = decode(self.root / tile.path, self.prep)
            with self._lock:
                self._cache[tile.path] = got
        return got


def build_window_shard(root: Path, logical: str, windows: Sequence[Window], div: int,
                       digests: Mapping[str, str], runner, prep: Preprocessing, batch: int,
                       ident: str, reuse: Reuse | None = None,
                       progress: Callable[[int], None] | None = None
                       ) -> tuple[ShardStats, list[str]]:
    """Write a block's window shard (the descriptor shard format, one row per window: its id in
    1/div tile, size 0, its window_key): only windows `reuse` has no trusted row for are cut and
    embedded. digests: tile path -> blake3. Returns the stats and the rows' keys."""
    records = [TileRecord(Tile(w.z, w.x, w.y, ""), 0,
                          window_key(w, div, [digests[t.path] for t in w.tiles])) for w in windows]
    by_id = {(w.x, w.y): w for w in windows}
    pixels = TilePixels(root, prep)

    def load(window: Window, prep: Preprocessing, out: np.ndarray) -> np.ndarray:
        return to_tensor(window_pixels(window, div, pixels), prep, out)

    def compute(items: Sequence[Window]):
        return (embed_tiles(runner, items, prep, batch, progress=progress, load=load),)

    stats = build_shard(root, logical, records, compute, ident, DESCRIPTORS, reuse,
                        inputs=lambda r: by_id[(r.tile.x, r.tile.y)])
    return stats, [r.blake3 for r in records]
