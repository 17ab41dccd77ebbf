"""Re-rank retrieval by local matching: candidate tiles by LightGlue matches with the query."""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from c10.errors import BUILD_FIRST, DescriptorBatchError
from c10.features.embedding import Features, run_local
from c10.features.preprocess import Preprocessing, to_tensor
from c10.features.shards import tile_features
from c10.store.layout import shard_relpath


@dataclass(frozen=True)
class Reranked:
    """One candidate tile after matching: its retrieval rank and score, and the match count."""

    tile: tuple[int, int, int]
    rank: int          # 0-based position in the retrieval list
    similarity: float  # the global descriptor score it was retrieved with
    matches: int       # LightGlue matches with the query


def count_matches(matcher, query: Features, tile: Features) -> int:
    """Matches between one query and one tile (each Features of a single image, no batch axis)."""
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
    return int((np.asarray(out["matches"]) > -1).sum())


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


class Reranker:
    """A cache's local-feature engine, its local shards and its matcher engine; `shard(logical)`
    gives a local shard's bytes (the flight cache reads them as signed)."""

    def __init__(self, local_runner, prep: Preprocessing, matcher_runner, local_model: str,
                 block: int, shard: Callable[[str], bytes]):
        self.local_runner, self.prep, self.shard = local_runner, prep, shard
        self.matcher_runner, self.local_model, self.block = matcher_runner, local_model, block

    def local_features(self, image: Image.Image) -> Features:
        return run_local(self.local_runner, to_tensor(image, self.prep)[None])[0]

    def rerank(self, image: Image.Image,
               candidates: Sequence[tuple[tuple, float]]) -> list[Reranked]:
        """Candidates (tile id, similarity) re-ranked by LightGlue matches with `image`, most
        first."""
        b = self.block
        rels = sorted({shard_relpath(self.local_model, (z, x // b, y // b))
                       for (z, x, y), _ in candidates})
        shards = [io.BytesIO(self.shard(rel)) for rel in rels]
        feats = tile_features(shards, [t for t, _ in candidates])
        return order_by_matches(self.matcher_runner, self.local_features(image), candidates, feats)

    def rerank_hits(self, image: Image.Image, hits) -> list[Reranked]:
        """`c10.query.search.Hit`s re-ranked by matches."""
        return self.rerank(image, [((h.z, h.x, h.y), h.score) for h in hits])


@dataclass(frozen=True)
class LocalizeResult:
    n: int
    strength: str
    seed: int
    k: int
    recall_retrieval: float  # top-1 of the index alone is the tile
    recall_reranked: float   # top-1 after re-ranking the top-k by matches is the tile
    recall_at_k: float       # the tile is among the top-k (what re-ranking can reach)


def localize_test(searcher, reranker: Reranker, load: Callable, n: int = 100,
                  strength: str = "strong", seed: int = 0, k: int = 5) -> LocalizeResult:
    """Perturb n random indexed tiles (as `c10 selftest`), retrieve the top-k, re-rank by
    matches."""
    from c10.query.views import perturb
    from c10.store.tiles import TileId

    rng = np.random.default_rng(seed)
    known = [t for t in (TileId(*(int(v) for v in r)) for r in searcher.ids) if t in searcher.paths]
    picked = [known[i] for i in rng.choice(len(known), size=min(n, len(known)), replace=False)]
    hits = [0, 0, 0]
    for tid in picked:
        view = perturb(load(tid), rng, strength)
        found = searcher.search(searcher.embed([view]), k)[0]
        ranked = reranker.rerank_hits(view, found)
        hits[0] += (found[0].z, found[0].x, found[0].y) == tuple(tid)
        hits[1] += ranked[0].tile == tuple(tid)
        hits[2] += any((h.z, h.x, h.y) == tuple(tid) for h in found)
    share = [round(h / max(len(picked), 1), 4) for h in hits]
    return LocalizeResult(len(picked), strength, seed, k, *share)
