"""models.global.decode on a real build: switching the mode re-embeds every tile (no row of the
other mode is reused), a rebuild in the same mode embeds nothing, and the aircraft decodes a
query frame the way the signed preprocessing says."""
from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
import pytest
from conftest import built, make_cache, plan_of

from c10.errors import VerifyError
from c10.features.preprocess import load_tensor, open_tile
from c10.features.shards import read_shard
from c10.query.flight import FlightCache, preprocessing


def counts(root, outcome: str = "success") -> tuple[int, int]:
    """(descriptors embedded, reused) of the last build, which ended in `outcome`."""
    report = json.loads((root / ".c10/report.json").read_bytes())
    assert report["outcome"] == outcome, report
    return report["descriptors_generated"], report["descriptors_reused"]


def set_decode(root, mode: str) -> None:
    toml = root / "c10.toml"
    text = re.sub(r'(?m)^decode = .*\n', "", toml.read_text())
    toml.write_text(re.sub(r"(?m)^(precision = .*)$", rf'\1\ndecode = "{mode}"', text, count=1))


def rows(root) -> dict[tuple[int, int], np.ndarray]:
    shards = sorted((root / "shards/global/15").iterdir())
    return {(int(r["x"]), int(r["y"])): r["desc"] for s in shards for r in read_shard(s)}


def test_a_mode_switch_re_embeds_every_tile_and_queries_follow_the_signed_mode(
        tmp_path, inputs, operator_key, capsys):
    root = make_cache(tmp_path / "cache", inputs, operator_key)  # 128 px tiles, 64 px input
    built(root, capsys)
    tiles, full_ident, full_rows = counts(root)[0], plan_of(root).plans["global"].ident, rows(root)
    set_decode(root, "scaled")
    built(root, capsys)
    assert counts(root) == (tiles, 0)  # every tile again: none of the full decode's rows
    assert plan_of(root).plans["global"].ident != full_ident
    scaled_rows = rows(root)
    assert scaled_rows.keys() == full_rows.keys()
    cosine = [float(scaled_rows[k] @ full_rows[k]) for k in full_rows]
    assert max(cosine) < 1 - 1e-6 and min(cosine) > 0.9  # a small, real change
    built(root, capsys)
    assert counts(root, "idempotent_no_op") == (0, 0)  # the same mode: nothing embedded

    pub = operator_key[1]
    cache = FlightCache.open(root, [pub])
    assert cache.model().preprocessing["decode"] == "scaled"
    searcher, _ = cache.searcher()
    assert searcher.prep.decode == "scaled"
    path = sorted((root / "tiles/15").rglob("*.jpg"))[5]
    hits = searcher.query_file(path, k=1)
    want = scaled_rows[(int(path.parent.name), int(path.stem))]
    assert (hits[0].x, hits[0].y) == (int(path.parent.name), int(path.stem))
    assert hits[0].score > 0.9999  # the frame decoded as the tile was: its very row
    np.testing.assert_allclose(searcher.embed([open_tile(path, searcher.prep)])[0], want,
                               atol=1e-5)
    assert not np.allclose(load_tensor(path, searcher.prep),
                           load_tensor(path, replace(searcher.prep, decode="full")))
    # a Manifest from a c10 with another mode: refused by name, not decoded some other way
    future = replace(cache.model(), preprocessing=cache.model().preprocessing | {"decode": "x"})
    with pytest.raises(VerifyError, match="decode .x.*rebuild the cache"):
        preprocessing(future)

    set_decode(root, "full")  # back: the full decode's rows (reused or embedded), no scaled one
    built(root, capsys)
    assert plan_of(root).plans["global"].ident == full_ident
    back = rows(root)
    for key, desc in full_rows.items():
        np.testing.assert_allclose(back[key], desc, atol=1e-6)
