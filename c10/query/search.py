"""Queries on a built cache: embed images as tiles are embedded, search the index, selftest."""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from c10.errors import DescriptorBatchError, IndexBuildError
from c10.features.embedding import l2_normalize
from c10.features.preprocess import Preprocessing, open_tile, to_tensor
from c10.query.geo import tile_latlon
from c10.store.tiles import TileId


@dataclass(frozen=True)
class Hit:
    """One index row: z/x/y is the tile under its footprint's centre (for tile rows, the tile);
    the footprint is the square of side 1 tile whose top-left is (fx, fy) in tile units at zoom z,
    and lat/lon is its centre."""

    rank: int
    z: int
    x: int
    y: int
    lat: float
    lon: float
    score: float  # cosine similarity of the unit descriptors, whatever the index metric
    path: str | None  # the listed file of tile z/x/y, if the cache holds it
    fx: float
    fy: float

    def holds(self, z: int, x: float, y: float) -> bool:
        """Whether the point (x, y) in tile units at zoom z lies in this row's footprint."""
        return z == self.z and self.fx <= x < self.fx + 1 and self.fy <= y < self.fy + 1

    def tiles(self) -> list[TileId]:
        """The 1 to 4 tiles the footprint touches, row by row."""
        xs = range(math.floor(self.fx), math.ceil(self.fx + 1))
        ys = range(math.floor(self.fy), math.ceil(self.fy + 1))
        return [TileId(self.z, x, y) for y in ys for x in xs]


class Searcher:
    """One global model of a cache: its loaded engine, its preprocessing and its index.

    ids: each index row's (z, X, Y) in units of 1/div tile: the row's footprint is the tile-sized
    square whose top-left is (X/div, Y/div) (div = 1: rows are tiles, ids are tile ids)."""

    def __init__(self, runner: Callable[[np.ndarray], np.ndarray], prep: Preprocessing, index,
                 ids: np.ndarray, metric: str, paths: dict[TileId, str] | None = None,
                 batch_size: int = 32, *, div: int = 1):
        if isinstance(div, bool) or not isinstance(div, numbers.Integral) or div < 1:
            raise IndexBuildError(f"index rows in units of 1/{div!r} tile: div must be a whole "
                                  "number >= 1", then="rebuild the cache with `doit build_cache`")
        self.runner, self.prep, self.index, self.ids = runner, prep, index, ids
        self.metric, self.paths, self.batch_size = metric, paths or {}, batch_size
        self.div = int(div)

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Unit descriptors of decoded images: to_tensor, the engine, l2_normalize, as every
        shard."""
        out = []
        for start in range(0, len(images), self.batch_size):
            part = images[start:start + self.batch_size]
            batch = np.empty((len(part), *self.prep.shape), np.float32)
            for i, img in enumerate(part):
                to_tensor(img, self.prep, batch[i])
            out.append(np.asarray(self.runner(batch), np.float32).reshape(len(part), -1))
        return l2_normalize(np.concatenate(out))

    def search(self, desc: np.ndarray, k: int) -> list[list[Hit]]:
        """The top-k tiles of each descriptor, best first."""
        k = max(1, min(k, len(self.ids)))
        values, rows = self.index.search(np.ascontiguousarray(desc, np.float32), k)
        # FAISS L2 gives squared distances; for unit vectors d^2 = 2 - 2 cos
        scores = values if self.metric == "ip" else 1.0 - values / 2.0
        return [[self._hit(rank + 1, row, score)
                 for rank, (row, score) in enumerate(zip(rs, ss)) if row >= 0]
                for rs, ss in zip(rows, scores)]

    def query_file(self, image: Path, k: int = 5) -> list[Hit]:
        """Top-k tiles for one image file, decoded exactly as tiles are (open_tile)."""
        try:
            img = open_tile(image, self.prep)
        except DescriptorBatchError as exc:  # its problem names the file; a query changes no tile
            raise DescriptorBatchError(f"{exc.problem} (a query image)",
                                       "give a JPEG, PNG or WebP file", then="") from None
        return self.search(self.embed([img]), k)[0]

    def _hit(self, rank: int, row: int, score: float) -> Hit:
        z, x, y = map(int, self.ids[row])
        fx, fy = x / self.div, y / self.div
        tid = TileId(z, math.floor(fx + 0.5), math.floor(fy + 0.5))
        lat, lon = tile_latlon(z, fx + 0.5, fy + 0.5)
        return Hit(rank, *tid, round(lat, 7), round(lon, 7), round(float(score), 6),
                   self.paths.get(tid), fx, fy)

    def listed_tiles(self) -> list[TileId]:
        """The tiles a selftest may cut queries from: listed tiles at the index's zooms (for tile
        rows: the indexed tiles the Manifest lists, in index order)."""
        if self.div == 1:
            indexed = (TileId(*map(int, row)) for row in self.ids)
            return [tid for tid in indexed if tid in self.paths]
        ids = np.asarray(self.ids)
        column = ids["z"] if ids.dtype.names else ids[:, 0]  # the id map's records, or a table
        zooms = {int(z) for z in np.unique(column)}
        return sorted(t for t in self.paths if t.z in zooms)


def footprint_at(z: int, x: float, y: float, div: int = 1, listed=None) -> Hit | None:
    """The footprint on the grid of 1/div tile whose centre is nearest the point (x, y) (it holds
    the point), as a Hit of rank 0 and score 0; None if `listed` lacks the tile under it."""
    fx, fy = (math.floor(v * div - div / 2 + 0.5) / div for v in (x, y))  # always holds (x, y)
    tid = TileId(z, math.floor(fx + 0.5), math.floor(fy + 0.5))
    if listed is not None and tid not in listed:
        return None
    lat, lon = tile_latlon(z, fx + 0.5, fy + 0.5)
    return Hit(0, *tid, round(lat, 7), round(lon, 7), 0.0, None, fx, fy)


@dataclass(frozen=True)
class SelftestResult:
    n: int
    strength: str
    seed: int
    recall_at_1: float
    recall_at_5: float
    misses: list  # [z, x, y] of tiles whose top-1 was another tile

    def to_json(self) -> dict:
        data = asdict(self)
        misses = data.pop("misses")
        data["recall@1"], data["recall@5"] = data.pop("recall_at_1"), data.pop("recall_at_5")
        return data | {"misses": misses}


def selftest(searcher: Searcher, load: Callable[[TileId], Image.Image], n: int = 100,
             strength: str = "mild", seed: int = 0) -> SelftestResult:
    """Perturb n random indexed tiles like camera frames (c10.query.views.perturb), query, count the
    hits; `load` gives a tile's image (the flight cache reads it as signed)."""
    from c10.query.views import perturb

    rng = np.random.default_rng(seed)
    known = searcher.listed_tiles()
    if not known:
        raise IndexBuildError("no indexed tile is listed in the Manifest",
                              then="rebuild the cache with `doit build_cache`")
    picked = [known[i] for i in rng.choice(len(known), size=min(n, len(known)), replace=False)]
    images = [perturb(load(tid), rng, strength) for tid in picked]
    found = searcher.search(searcher.embed(images), 5)
    # a hit: a row whose footprint holds the tile's centre (for tile rows: the tile itself)
    top = [[h.holds(tid.z, tid.x + 0.5, tid.y + 0.5) for h in hits]
           for hits, tid in zip(found, picked)]
    at1 = [t[:1] == [True] for t in top]
    at5 = [any(t) for t in top]
    return SelftestResult(len(picked), strength, seed, round(float(np.mean(at1)), 4),
                          round(float(np.mean(at5)), 4),
                          [list(tid) for tid, ok in zip(picked, at1) if not ok])


def format_hits(hits: Sequence[Hit]) -> str:
    """The hits as a table; with windows among them, each row's footprint (top-left, in tiles)."""
    windows = any(not (float(h.fx).is_integer() and float(h.fy).is_integer()) for h in hits)
    extra = f" {'footprint x,y':>19}" if windows else ""
    lines = [f"{'rank':>4} {'z':>3} {'x':>8} {'y':>8} {'lat':>11} {'lon':>11} {'score':>7}"
             f"{extra}  tile"]
    lines += [f"{h.rank:>4} {h.z:>3} {h.x:>8} {h.y:>8} {h.lat:>11.6f} {h.lon:>11.6f} "
              f"{h.score:>7.4f}{f' {h.fx:>9g},{h.fy:<9g}' if windows else ''}  {h.path or '-'}"
              for h in hits]
    return "\n".join(lines)
