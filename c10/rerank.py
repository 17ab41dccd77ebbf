"""Confirm retrieval by local matching: re-rank candidate tiles by LightGlue matches with the query."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from c10.errors import DescriptorBatchError
from c10.local_shards import Features


@dataclass(frozen=True)
class Verified:
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
        raise DescriptorBatchError(f"the matcher engine takes inputs {matcher.input_names}; c10 feeds "
                                   f"{sorted(feeds)}; export it with `c10 export-models CACHE`")
    out = dict(zip(matcher.output_names,
                   matcher.run({n: np.ascontiguousarray(feeds[n][None], np.float32) for n in matcher.input_names})))
    return int((np.asarray(out["matches"]) > -1).sum())


def rerank(matcher, query: Features, candidates: Sequence[tuple[tuple[int, int, int], float]],
           features: dict) -> list[Verified]:
    """Candidates (tile id, similarity) in retrieval order -> Verified, most matches first
    (ties keep retrieval order). `features` maps tile id -> Features from the local shards."""
    out = []
    for rank, (tile, similarity) in enumerate(candidates):
        tile = tuple(int(v) for v in tile)
        if tile not in features:
            raise DescriptorBatchError(f"tile {tile} has no local features in the cache; run "
                                       "`doit build_cache` so the local shards are built")
        out.append(Verified(tile, rank, float(similarity), count_matches(matcher, query, features[tile])))
    return sorted(out, key=lambda v: (-v.matches, v.rank))
