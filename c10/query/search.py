"""Queries on a built cache: embed images as tiles are embedded, search the index, selftest."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from c10.errors import DescriptorBatchError, IndexBuildError
from c10.features.embedding import l2_normalize
from c10.features.preprocess import Preprocessing, open_tile, to_tensor
from c10.store.tiles import TileId, center_latlon


@dataclass(frozen=True)
class Hit:
    rank: int
    z: int
    x: int
    y: int
    lat: float
    lon: float
    score: float  # cosine similarity of the unit descriptors, whatever the index metric
    path: str | None


class Searcher:
    """One global model of a cache: its loaded engine, its preprocessing and its index."""

    def __init__(self, runner: Callable[[np.ndarray], np.ndarray], prep: Preprocessing, index,
                 ids: np.ndarray, metric: str, paths: dict[TileId, str] | None = None,
                 batch_size: int = 32):
        self.runner, self.prep, self.index, self.ids = runner, prep, index, ids
        self.metric, self.paths, self.batch_size = metric, paths or {}, batch_size

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
            img = open_tile(image)
        except DescriptorBatchError as exc:  # its problem names the file; a query changes no tile
            raise DescriptorBatchError(f"{exc.problem} (a query image)",
                                       "give a JPEG, PNG or WebP file", then="") from None
        return self.search(self.embed([img]), k)[0]

    def _hit(self, rank: int, row: int, score: float) -> Hit:
        tid = TileId(*map(int, self.ids[row]))
        lat, lon = center_latlon(tid)
        return Hit(rank, *tid, round(lat, 7), round(lon, 7), round(float(score), 6),
                   self.paths.get(tid))




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
    indexed = (TileId(*map(int, row)) for row in searcher.ids)
    known = [tid for tid in indexed if tid in searcher.paths]
    if not known:
        raise IndexBuildError("no indexed tile is listed in the Manifest",
                              then="rebuild the cache with `doit build_cache`")
    picked = [known[i] for i in rng.choice(len(known), size=min(n, len(known)), replace=False)]
    images = [perturb(load(tid), rng, strength) for tid in picked]
    found = searcher.search(searcher.embed(images), 5)
    top = [[(h.z, h.x, h.y) for h in hits] for hits in found]
    at1 = [t[:1] == [tuple(tid)] for t, tid in zip(top, picked)]
    at5 = [tuple(tid) in t for t, tid in zip(top, picked)]
    return SelftestResult(len(picked), strength, seed, round(float(np.mean(at1)), 4),
                          round(float(np.mean(at5)), 4),
                          [list(tid) for tid, ok in zip(picked, at1) if not ok])


def format_hits(hits: Sequence[Hit]) -> str:
    lines = [f"{'rank':>4} {'z':>3} {'x':>8} {'y':>8} {'lat':>11} {'lon':>11} {'score':>7}  tile"]
    lines += [f"{h.rank:>4} {h.z:>3} {h.x:>8} {h.y:>8} {h.lat:>11.6f} {h.lon:>11.6f} "
              f"{h.score:>7.4f}  {h.path or '-'}"
              for h in hits]
    return "\n".join(lines)
