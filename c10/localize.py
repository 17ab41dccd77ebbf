"""Confirm retrieval by local matching over a built cache: the onboard pipeline in miniature."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from c10.local_shards import Features, run_local, tile_features
from c10.paths import shard_relpath
from c10.refs import locate
from c10.preprocess import Preprocessing, open_tile, to_tensor
from c10.rerank import Verified, rerank


class Verifier:
    """A cache's local-feature engine, its local shards and its matcher engine."""

    def __init__(self, root: Path, local_runner, prep: Preprocessing, matcher_runner, local_model: str,
                 block: int):
        self.root, self.local_runner, self.prep = Path(root), local_runner, prep
        self.matcher_runner, self.local_model, self.block = matcher_runner, local_model, block

    def local_features(self, image: Image.Image) -> Features:
        return run_local(self.local_runner, to_tensor(image, self.prep)[None])[0]

    def verify(self, image: Image.Image, candidates: Sequence[tuple[tuple, float]]) -> list[Verified]:
        """Candidates (tile id, similarity) re-ranked by LightGlue matches with `image`, most first."""
        b = self.block
        rels = sorted({shard_relpath(self.local_model, (z, x // b, y // b)) for (z, x, y), _ in candidates})
        feats = tile_features(locate(self.root, rels).values(), [t for t, _ in candidates])
        return rerank(self.matcher_runner, self.local_features(image), candidates, feats)

    def verify_hits(self, image: Image.Image, hits) -> list[Verified]:
        """`c10.query.Hit`s re-ranked by matches."""
        return self.verify(image, [((h.z, h.x, h.y), h.score) for h in hits])


@dataclass(frozen=True)
class LocalizeResult:
    n: int
    strength: str
    seed: int
    k: int
    recall_retrieval: float  # top-1 of the index alone is the tile
    recall_verified: float   # top-1 after re-ranking the top-k by matches is the tile
    recall_at_k: float       # the tile is among the top-k (what re-ranking can reach)


def localize_test(searcher, verifier: Verifier, root: Path, n: int = 100, strength: str = "strong",
                  seed: int = 0, k: int = 5) -> LocalizeResult:
    """Perturb n random indexed tiles (as `c10 selftest`), retrieve the top-k, re-rank by matches."""
    from c10.synth import perturb
    from c10.tiles import TileId

    rng = np.random.default_rng(seed)
    known = [t for t in (TileId(*(int(v) for v in r)) for r in searcher.ids) if t in searcher.paths]
    picked = [known[i] for i in rng.choice(len(known), size=min(n, len(known)), replace=False)]
    hits = [0, 0, 0]
    for tid in picked:
        view = perturb(open_tile(Path(root) / searcher.paths[tid]), rng, strength)
        found = searcher.search(searcher.embed([view]), k)[0]
        ranked = verifier.verify_hits(view, found)
        hits[0] += (found[0].z, found[0].x, found[0].y) == tuple(tid)
        hits[1] += ranked[0].tile == tuple(tid)
        hits[2] += any((h.z, h.x, h.y) == tuple(tid) for h in found)
    share = [round(h / max(len(picked), 1), 4) for h in hits]
    return LocalizeResult(len(picked), strength, seed, k, *share)
