"""Re-rank retrieval by geometry: keypoint pairs with each candidate, RANSAC-verified inliers."""
from __future__ import annotations

import io
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Container, Sequence

import numpy as np
from PIL import Image

from c10.errors import BUILD_FIRST, ConfigError, DescriptorBatchError
from c10.features.embedding import OUTPUTS, Features, run_local
from c10.features.preprocess import Preprocessing, to_tensor
from c10.features.shards import read_shard
from c10.query import locate
from c10.store.layout import shard_relpath
from c10.store.tiles import TileId

SHARDS_KEPT = 8  # decoded local shards kept between queries (block 16, K 256: ~34 MB each)
# Two ways to pair keypoints before RANSAC. "mnn": mutual nearest neighbours of the descriptors
# with cosine >= MNN_MIN_COS, under 1 ms a candidate, so even the top 50 verify within the
# 0.5 s budget of a frame. Measured on the real-model demo (ALIKED): a strongly perturbed tile
# keeps a median 161 pairs with itself (min 40) and 0 with other tiles (max 29); over 60 frames
# x top 20, fits that put a frame elsewhere kept at most 10 inliers (at cosine 0.6: up to 18).
# "lightglue": the cache's signed matcher engine, ~0.2 s a call on one of 2 CPU cores; published
# as the stronger pairing under season and parallax change, which the synthetic demo lacks.
# Figures: docs/figures.md.
MATCHING = ("mnn", "lightglue")
MNN_MIN_COS = 0.7
# Inliers a fit needs, per pairing: above what fits that put a frame elsewhere kept (same demo,
# frames x top 10): mnn at most 10 of 60 x 20; LightGlue up to 24 (19 next) of 30 x 10, where
# right fits kept 16-201 (20 drops 2 of 19 right ones and all but 1 of 138 wrong ones).
MIN_INLIERS = {"mnn": 12, "lightglue": 20}


@dataclass(frozen=True)
class Reranked:
    """One candidate after matching: its retrieval rank and score, matches and verified inliers."""

    tile: tuple[int, int, int]  # the hit's z/x/y (for a window: the tile under its centre)
    rank: int | None            # 0-based position in the retrieval list (None: not retrieved,
    #                             verified because it holds the fitted centre)
    similarity: float | None    # the global descriptor score it was retrieved with
    matches: int                # keypoint pairs with the query (mutual neighbours or LightGlue)
    inliers: int = 0            # pairs the RANSAC similarity keeps (0: no model fits)
    fit: locate.Fit | None = field(default=None, repr=False, compare=False)
    hit: object = field(default=None, repr=False, compare=False)  # its c10.query.search.Hit


@dataclass(frozen=True)
class Verified:
    """A frame's candidates re-ranked by inliers, its position (None: `reason` says why) and the
    seconds each stage took."""

    ranked: list[Reranked]
    position: locate.Position | None
    reason: str | None
    timings: dict[str, float]


def match_pairs(matcher, query: Features, tile: Features) -> tuple[np.ndarray, np.ndarray]:
    """(query indices, tile indices) of the matches between two single images' Features."""
    feeds = {"kpts0": query.keypoints, "desc0": query.descriptors,
             "kpts1": tile.keypoints, "desc1": tile.descriptors}
    missing = [n for n in matcher.input_names if n not in feeds]
    if missing:
        raise DescriptorBatchError(f"the matcher engine takes inputs {matcher.input_names}; "
                                   f"c10 feeds {sorted(feeds)}",
                                   fix="export it with `c10 export-models CACHE`")
    out = dict(zip(matcher.output_names,
                   matcher.run({n: np.ascontiguousarray(feeds[n][None], np.float32)
                                for n in matcher.input_names})))
    matches = np.asarray(out["matches"]).reshape(-1)
    keep = np.flatnonzero(matches > -1)
    return keep, matches[keep].astype(np.int64)


def mutual_nearest(query: Features, tile: Features,
                   min_cos: float = MNN_MIN_COS) -> tuple[np.ndarray, np.ndarray]:
    """(query indices, tile indices) of descriptor pairs that are each other's nearest neighbour
    with cosine >= min_cos (ALIKED descriptors are unit vectors)."""
    return mutual_nearest_all(query, [tile], min_cos)[0]


def mutual_nearest_all(query: Features, tiles: Sequence[Features],
                       min_cos: float = MNN_MIN_COS) -> list[tuple[np.ndarray, np.ndarray]]:
    """mutual_nearest of the query with each of `tiles`, the similarities in one matrix product
    (one BLAS call instead of one per candidate: each call wakes BLAS's threads, which on 2
    cores shared with the engines cost more than the product itself)."""
    if not tiles:
        return []
    bounds = np.cumsum([0] + [len(t.descriptors) for t in tiles])
    sim = query.descriptors @ np.concatenate([t.descriptors for t in tiles]).T
    rows = np.arange(len(query.descriptors))
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        part = sim[:, lo:hi]
        best, back = part.argmax(axis=1), part.argmax(axis=0)
        keep = np.flatnonzero((back[best] == rows) & (part[rows, best] >= min_cos))
        out.append((keep, best[keep]))
    return out


def count_matches(matcher, query: Features, tile: Features) -> int:
    """Matches between one query and one tile (each Features of a single image, no batch axis)."""
    return len(match_pairs(matcher, query, tile)[0])


def order_by_matches(matcher, query: Features,
                     candidates: Sequence[tuple[tuple[int, int, int], float]],
                     features: dict) -> list[Reranked]:
    """Candidates (tile id, similarity) in retrieval order -> Reranked, most matches first
    (ties keep retrieval order). `features` maps tile id -> Features from the local shards."""
    out = []
    for rank, (tile, similarity) in enumerate(candidates):
        tile = tuple(int(v) for v in tile)
        if tile not in features:
            raise DescriptorBatchError(f"tile {tile} has no local features in the cache",
                                       then=BUILD_FIRST)
        out.append(Reranked(tile, rank, float(similarity),
                            count_matches(matcher, query, features[tile])))
    return sorted(out, key=lambda v: (-v.matches, v.rank))


def footprint_features(hit, tiles: dict[TileId, Features], side: tuple[int, int],
                       keypoints: int) -> Features:
    """The local features of a hit's footprint, from the cached features of the tiles it touches
    (no second local pass): keypoints shifted into the footprint's pixels (`side`: the local
    model's input W, H), those inside first by score, exactly `keypoints` of them (the matcher's
    fixed K). A footprint that is one tile gets that tile's features unchanged."""
    if len(tiles) == 1 and float(hit.fx).is_integer() and float(hit.fy).is_integer():
        return next(iter(tiles.values()))
    w, h = side
    parts = []
    for tid, f in tiles.items():
        kp = f.keypoints + np.array([(tid.x - hit.fx) * w, (tid.y - hit.fy) * h], np.float32)
        parts.append((kp, f.descriptors, f.scores))
    kp, desc, scores = (np.concatenate(c) for c in zip(*parts))
    inside = (kp[:, 0] >= -0.5) & (kp[:, 0] < w - 0.5) & (kp[:, 1] >= -0.5) & (kp[:, 1] < h - 0.5)
    order = np.lexsort((-scores, ~inside))[:keypoints]
    order = np.resize(order, keypoints)  # a footprint at the area's edge: fewer, some twice
    return Features(kp[order], desc[order], scores[order])


class Reranker:
    """A cache's local-feature engine, its local shards and (for "lightglue") its matcher engine;
    `shard(logical)` gives a local shard's bytes (the flight cache reads them as signed), `listed`
    the tiles the cache holds (a window at the area's edge touches tiles that do not exist)."""

    def __init__(self, local_runner, prep: Preprocessing, matcher_runner, local_model: str,
                 block: int, shard: Callable[[str], bytes],
                 listed: Container[TileId] | None = None, matching: str = "mnn"):
        if matching not in MATCHING:
            raise ConfigError(f"--matcher {matching!r}: allowed: {', '.join(MATCHING)}")
        if matching == "lightglue" and matcher_runner is None:
            raise ConfigError("--matcher lightglue needs the cache's model with role = "
                              "\"matcher\"", "`c10 export-models` writes it; then rebuild the "
                              "cache, or use --matcher mnn")
        self.local_runner, self.prep, self.shard = local_runner, prep, shard
        self.matcher_runner, self.local_model, self.block = matcher_runner, local_model, block
        self.listed, self.matching = listed, matching
        self._shards: OrderedDict[str, dict[TileId, Features]] = OrderedDict()

    def local_features(self, image: Image.Image) -> Features:
        return run_local(self.local_runner, to_tensor(image, self.prep)[None])[0]

    def tile_features(self, tiles) -> dict[TileId, Features]:
        """Features of listed tiles, from their shards (each decoded once, the last few kept)."""
        b, out = self.block, {}
        for tid in tiles:
            tid = TileId(*(int(v) for v in tid))
            rows = self._shard(shard_relpath(self.local_model, (tid.z, tid.x // b, tid.y // b)))
            if tid not in rows:
                raise DescriptorBatchError(f"tile {tuple(tid)} has no local features in the cache",
                                           then=BUILD_FIRST)
            out[tid] = rows[tid]
        return out

    def _shard(self, logical: str) -> dict[TileId, Features]:
        if logical in self._shards:
            self._shards.move_to_end(logical)
            return self._shards[logical]
        rows = read_shard(io.BytesIO(self.shard(logical)))
        ids = zip(rows["z"].tolist(), rows["x"].tolist(), rows["y"].tolist())
        columns = [rows[name] for name in OUTPUTS]
        self._shards[logical] = {TileId(*t): Features(*(c[i] for c in columns))
                                 for i, t in enumerate(ids)}
        while len(self._shards) > SHARDS_KEPT:
            self._shards.popitem(last=False)
        return self._shards[logical]

    def verify(self, image: Image.Image, hits, div: int = 1) -> Verified:
        """`c10.query.search.Hit`s re-ranked by RANSAC inliers with `image` (ties: matches, then
        retrieval rank), and where the image's centre is. The first entry is then the footprint
        (on the index's grid of 1/div tile) that holds that centre: a retrieved one, else one
        verified for it (rank None), so the top answer is where the frame is even when retrieval
        found only a neighbour."""
        timings = dict.fromkeys(("local", "features", "match", "ransac"), 0.0)
        t0 = time.perf_counter()
        query = self.local_features(image)
        timings["local"] = time.perf_counter() - t0
        ranked = self._check(image, query, hits, range(len(hits)), timings)
        ranked.sort(key=_order)
        fits = [v.fit for v in ranked if v.fit is not None]
        if not fits:
            most = max((v.matches for v in ranked), default=0)
            return Verified(ranked, None, "no candidate's matches fit one similarity with at least "
                            f"{MIN_INLIERS[self.matching]} inliers (most matches: {most})",
                            timings)
        t0 = time.perf_counter()
        best = locate.fuse(fits, fits[0], image.size)
        timings["ransac"] += time.perf_counter() - t0
        pos = locate.position(best, fits, image.size)
        return Verified(self._recentre(image, query, ranked, pos, div, timings), pos, None,
                        timings)

    def _check(self, image, query: Features, hits, ranks, timings) -> list[Reranked]:
        """Pair each candidate footprint's keypoints with the query's and fit a similarity."""
        t0 = time.perf_counter()
        w, h = self.prep.input_size[1], self.prep.input_size[0]
        cands = []
        for hit in hits:
            touched = [t for t in hit.tiles() if self.listed is None or t in self.listed]
            if not touched:
                raise DescriptorBatchError(f"index row {hit.z}/{hit.fx}/{hit.fy} covers no tile "
                                           "the cache lists", then=BUILD_FIRST)
            cands.append(footprint_features(hit, self.tile_features(touched), (w, h),
                                            len(query.keypoints)))
        t1 = time.perf_counter()
        pairs = (mutual_nearest_all(query, cands) if self.matching == "mnn"
                 else self._lightglue(query, cands))
        t2 = time.perf_counter()
        # continuous coordinates (pixel edges on integers; keypoints are pixel centres): frame
        # pixels on one side, tile units on the other
        frame_px = (query.keypoints.astype(np.float64) + 0.5) * (image.size[0] / w,
                                                                 image.size[1] / h)
        out = []
        for hit, rank, cand, (qi, ci) in zip(hits, ranks, cands, pairs):
            dst = (cand.keypoints[ci].astype(np.float64) + 0.5) / (w, h) + (hit.fx, hit.fy)
            fit = locate.fit_similarity(hit.z, frame_px[qi], dst, (hit.fx, hit.fy), w,
                                        MIN_INLIERS[self.matching])
            if fit is not None and not locate.plausible(fit, image.size):
                fit = None
            out.append(Reranked((hit.z, hit.x, hit.y), rank,
                                None if rank is None else float(hit.score), len(qi),
                                fit.inliers if fit else 0, fit, hit))
        timings["features"] += t1 - t0
        timings["match"] += t2 - t1
        timings["ransac"] += time.perf_counter() - t2
        return out

    def _lightglue(self, query: Features, cands: list[Features]):
        """match_pairs of each candidate, one call per stream of the matcher's engine at once
        (a call runs on one core, c10.features.backends; measured on the 2 shared cores here,
        busy with other jobs: 10 pairs in 1.54-1.67 s against 1.69-1.81 s one after another)."""
        from c10.features.pools import worker_pool

        streams = min(getattr(self.matcher_runner, "streams", 1), len(cands))
        if streams <= 1:
            return [match_pairs(self.matcher_runner, query, c) for c in cands]
        pool = worker_pool("match", streams)
        return list(pool.map(lambda c: match_pairs(self.matcher_runner, query, c), cands))

    def _recentre(self, image, query, ranked: list[Reranked], pos: locate.Position, div: int,
                  timings) -> list[Reranked]:
        """`ranked` with the footprint that holds `pos` first, when one fits there too."""
        holds = [v for v in ranked if v.hit.holds(pos.z, pos.x, pos.y)]
        if not holds:
            from c10.query.search import footprint_at

            hit = footprint_at(pos.z, pos.x, pos.y, div, self.listed)
            if hit is None:
                return ranked
            holds = self._check(image, query, [hit], [None], timings)
        first = min(holds, key=_order)
        if first.fit is None:
            return ranked
        return [first] + [v for v in ranked if v is not first]

    def rerank_hits(self, image: Image.Image, hits, div: int = 1) -> list[Reranked]:
        """`c10.query.search.Hit`s re-ranked by inliers."""
        return self.verify(image, hits, div).ranked


def _order(v: Reranked):
    return (-v.inliers, -v.matches, v.rank if v.rank is not None else 1 << 30)


@dataclass(frozen=True)
class LocalizeResult:
    n: int
    strength: str
    seed: int
    k: int
    recall_retrieval: float  # top-1 of the index alone is the tile
    recall_reranked: float   # top-1 after re-ranking the top-k by inliers is the tile
    recall_at_k: float       # the tile is among the top-k (what re-ranking can reach)


def localize_test(searcher, reranker: Reranker, load: Callable, n: int = 100,
                  strength: str = "strong", seed: int = 0, k: int = 5) -> LocalizeResult:
    """Perturb n random indexed tiles (as `c10 selftest`), retrieve the top-k, re-rank by
    inliers."""
    from c10.query.views import perturb

    rng = np.random.default_rng(seed)
    known = searcher.listed_tiles()
    picked = [known[i] for i in rng.choice(len(known), size=min(n, len(known)), replace=False)]
    hits = [0, 0, 0]
    for tid in picked:
        view = perturb(load(tid), rng, strength)
        found = searcher.search(searcher.embed([view]), k)[0]
        ranked = reranker.rerank_hits(view, found, searcher.div)
        centre = (tid.z, tid.x + 0.5, tid.y + 0.5)
        hits[0] += found[0].holds(*centre)
        hits[1] += ranked[0].hit.holds(*centre)
        hits[2] += any(h.holds(*centre) for h in found)
    share = [round(h / max(len(picked), 1), 4) for h in hits]
    return LocalizeResult(len(picked), strength, seed, k, *share)
