"""`c10` subcommands that query a built cache: query (with --rerank) and selftest."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from c10.cli import positive


def _trust_options(cmd) -> None:
    cmd.add_argument("--trusted-keys", action="append", default=[], metavar="KEY",
                     help="public key file or 64-hex raw key the Manifest must be signed by; "
                          "default: every key in ~/.config/c10/trusted/")
    cmd.add_argument("--state", type=Path, help="anti-rollback state file to check against "
                                                "(default: none; `c10 verify` keeps one)")


# Candidates re-ranked by default: mutual-neighbour pairing verifies one in under 1 ms, LightGlue
# in ~0.1-0.2 s on 2 CPU cores, so each gets what the 0.5 s frame budget allows; frames' recall@1
# from the top 10 -> 50: 0.41 -> 0.78 (tiles), 0.74 -> 0.91 (windows) (docs/figures.md).
RERANK_K = {"mnn": 50, "lightglue": 10}


def _rerank_options(cmd, what: str) -> None:
    cmd.add_argument("--rerank", action="store_true",
                     help=f"re-rank the top-k {what} by RANSAC-verified inliers with the cache's "
                          "local features and fit the frame's position (lat/lon, heading, "
                          "scale)")
    cmd.add_argument("--matcher", choices=("mnn", "lightglue"), default="mnn",
                     help="how --rerank pairs keypoints: mutual nearest descriptors (mnn, "
                          "default, under 1 ms a candidate) or the cache's LightGlue engine "
                          "(~0.1-0.2 s a candidate on 2 CPU cores)")


def register(sub) -> None:
    """query and selftest: the cache's own engine and index, as the aircraft will use them:
    only from its verified Manifest and the files it signs."""
    cmd = sub.add_parser("query",
                         help="embed IMAGE with DIR's own engine; print the top-k tiles with "
                              "lat/lon (--rerank: and where IMAGE is)")
    cmd.add_argument("dir", type=Path)
    cmd.add_argument("image", type=Path)
    cmd.add_argument("-k", type=positive,
                     help="how many index rows (default 5; with --rerank the candidates "
                          f"re-ranked: {RERANK_K['mnn']}, {RERANK_K['lightglue']} with "
                          "--matcher lightglue)")
    cmd.add_argument("--model", help="global model to query (default: the Manifest's first)")
    _trust_options(cmd)
    cmd.add_argument("--json", action="store_true", help="one JSON object")
    _rerank_options(cmd, "hits")
    # the name of c10 0.1, kept one release: "verify" now means only `c10 verify`
    cmd.add_argument("--verify", dest="rerank", action="store_true", help=argparse.SUPPRESS)
    cmd.set_defaults(func=cmd_query)
    cmd = sub.add_parser("selftest",
                         help="query N randomly perturbed tiles of DIR (--frames: camera-like "
                              "frames cut from its mosaic); print recall@1 and recall@5")
    cmd.add_argument("dir", type=Path)
    cmd.add_argument("-n", type=positive, default=100,
                     help="how many tiles or frames (default 100)")
    cmd.add_argument("--strength", choices=("mild", "strong"), default="mild",
                     help="perturbation of the tile-aligned test (default mild)")
    cmd.add_argument("--frames", action="store_true",
                     help="frames centred anywhere on a tile, spanning up to four, rotated and "
                          "brightness-shifted; adds the position error in metres")
    cmd.add_argument("--degrees", type=float, default=10.0,
                     help="--frames: rotation drawn in +-DEGREES (default 10)")
    cmd.add_argument("-k", type=positive,
                     help="--frames --rerank: candidates re-ranked (default as `c10 query`)")
    _rerank_options(cmd, "candidates of each frame (needs --frames)")
    cmd.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    cmd.add_argument("--model", help="global model to test (default: the Manifest's first)")
    _trust_options(cmd)
    cmd.add_argument("--json", action="store_true", help="one JSON object")
    cmd.set_defaults(func=cmd_selftest)


def open_flight_cache(args):
    """The cache of `args.dir`, its Manifest verified against the trusted keys."""
    from c10.cli.trust import trust_store_keys
    from c10.query.flight import FlightCache
    from c10.store.lock import require_cache_root

    return FlightCache.open(require_cache_root(args.dir), args.trusted_keys or trust_store_keys(),
                            state_path=args.state)


def _k(args) -> int:
    return args.k or (RERANK_K[args.matcher] if args.rerank else 5)


def cmd_query(args) -> int:
    from dataclasses import asdict

    from c10.query.search import format_hits

    cache = open_flight_cache(args)
    searcher, model = cache.searcher(args.model)
    root = cache.root
    hits = searcher.query_file(args.image, _k(args))
    verified = _verified(cache, searcher, args, hits) if args.rerank else None
    if args.json:
        out = {"cache": str(root), "image": str(args.image), "model": model,
               "hits": [asdict(h) for h in hits]}
        if verified is not None:
            rows = [_row(v) for v in verified.ranked]
            out |= {"matcher": args.matcher, "reranked": rows, "best": rows[0] if rows else None,
                    "position": verified.position and verified.position.to_json(),
                    "position_reason": verified.reason,
                    "seconds": {k: round(v, 4) for k, v in verified.timings.items()}}
        print(json.dumps(out))
        return 0
    print(f"c10 query: {args.image} in {root} (model {model}, {len(searcher.ids)} rows indexed)")
    print(format_hits(hits))
    if verified is not None:
        print(f"re-ranked by inliers ({args.matcher}): " + ", ".join(
            f"{v.tile[0]}/{v.tile[1]}/{v.tile[2]} {v.inliers}/{v.matches}"
            for v in verified.ranked[:10]))
        print(position_line(verified))
    return 0


def position_line(verified) -> str:
    """The fitted position in one line, or why there is none."""
    p = verified.position
    if p is None:
        return f"position: none ({verified.reason})"
    tile = verified.ranked[0].tile
    return (f"position: lat {p.lat:.6f}, lon {p.lon:.6f}, heading {p.heading:.1f} deg, scale "
            f"{p.scale:.3f} tiles ({p.m_per_px:.2f} m/px), {p.inliers} inliers, confidence "
            f"{p.confidence:.2f} (tile {tile[0]}/{tile[1]}/{tile[2]})")


def _verified(cache, searcher, args, hits):
    """The hits re-ranked by inliers with the image, and its position."""
    from c10.features.preprocess import open_tile

    return cache.reranker(args.matcher).verify(open_tile(args.image), hits, searcher.div)


def _row(v) -> dict:
    h = v.hit
    return {"z": h.z, "x": h.x, "y": h.y, "fx": h.fx, "fy": h.fy, "lat": h.lat, "lon": h.lon,
            "rank": None if v.rank is None else h.rank, "score": v.similarity,
            "matches": v.matches, "inliers": v.inliers}


def cmd_selftest(args) -> int:
    from c10.errors import ConfigError
    from c10.query.search import selftest

    if (args.rerank or args.k) and not args.frames:
        raise ConfigError("c10 selftest: --rerank and -k re-rank camera-like frames",
                          "add --frames (the tile-aligned test is retrieval only)")
    cache = open_flight_cache(args)
    searcher, model = cache.searcher(args.model)
    if args.frames:
        return _frames(cache, searcher, model, args)
    root = cache.root
    result = selftest(searcher, cache.load_tile, args.n, args.strength, args.seed)
    if args.json:
        print(json.dumps({"cache": str(root), "model": model, **result.to_json()}))
    else:
        print(f"c10 selftest: {result.n} tiles of {root} (model {model}), {result.strength} "
              f"perturbation, seed {result.seed}: recall@1 {result.recall_at_1:.3f}, recall@5 "
              f"{result.recall_at_5:.3f}")
    return 0


def _frames(cache, searcher, model: str, args) -> int:
    from c10.query.frames import frames_selftest

    reranker = cache.reranker(args.matcher) if args.rerank else None
    r = frames_selftest(searcher, cache.load_tile, args.n, args.seed, reranker, _k(args),
                        args.degrees)
    if args.json:
        print(json.dumps({"cache": str(cache.root), "model": model,
                          "matcher": args.matcher if args.rerank else None, **r.to_json()}))
        return 0
    how = (f"re-rank of the top {r.k} by {args.matcher}" if args.rerank else "retrieval only")
    print(f"c10 selftest --frames: {r.n} frames of {cache.root} (model {model}, +-{r.degrees:g} "
          f"deg, seed {r.seed}, {how}): recall@1 {r.recall_at_1:.3f}, recall@5 "
          f"{r.recall_at_5:.3f}")
    if r.position_error_m_median is None:
        print(f"position: no frame fitted (tile {r.tile_size_m:.0f} m)")
    elif args.rerank:
        print(f"position error of the fit: median {r.position_error_m_median:.1f} m, p90 "
              f"{r.position_error_m_p90:.1f} m (tile {r.tile_size_m:.0f} m); {r.located:.0%} of "
              "frames located")
    else:
        print(f"position error of the top-1 footprint's centre (no fit without --rerank): median "
              f"{r.position_error_m_median:.1f} m, p90 {r.position_error_m_p90:.1f} m (tile "
              f"{r.tile_size_m:.0f} m)")
    return 0
