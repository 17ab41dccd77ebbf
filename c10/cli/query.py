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


def register(sub) -> None:
    """query and selftest: the cache's own engine and index, as the aircraft will use them:
    only from its verified Manifest and the files it signs."""
    cmd = sub.add_parser("query",
                         help="embed IMAGE with DIR's own engine; print the top-k tiles with "
                              "lat/lon")
    cmd.add_argument("dir", type=Path)
    cmd.add_argument("image", type=Path)
    cmd.add_argument("-k", type=positive, default=5, help="how many tiles (default 5)")
    cmd.add_argument("--model", help="global model to query (default: the Manifest's first)")
    _trust_options(cmd)
    cmd.add_argument("--json", action="store_true", help="one JSON object")
    cmd.add_argument("--rerank", action="store_true",
                     help="re-rank the top-k by LightGlue matches with IMAGE (the cache's local "
                          "and matcher models)")
    # the name of c10 0.1, kept one release: "verify" now means only `c10 verify`
    cmd.add_argument("--verify", dest="rerank", action="store_true", help=argparse.SUPPRESS)
    cmd.set_defaults(func=cmd_query)
    cmd = sub.add_parser("selftest",
                         help="query N randomly perturbed tiles of DIR; print recall@1 and "
                              "recall@5")
    cmd.add_argument("dir", type=Path)
    cmd.add_argument("-n", type=positive, default=100, help="how many tiles (default 100)")
    cmd.add_argument("--strength", choices=("mild", "strong"), default="mild",
                     help="perturbation (default mild)")
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


def cmd_query(args) -> int:
    from dataclasses import asdict

    from c10.query.search import format_hits

    cache = open_flight_cache(args)
    searcher, model = cache.searcher(args.model)
    root = cache.root
    hits = searcher.query_file(args.image, args.k)
    reranked = _reranked(cache, args.image, hits) if args.rerank else None
    if args.json:
        print(json.dumps({"cache": str(root), "image": str(args.image), "model": model,
                          "hits": [asdict(h) for h in hits]}
                         | ({"reranked": reranked, "best": reranked[0]} if reranked else {})))
    else:
        print(f"c10 query: {args.image} in {root} (model {model}, {len(searcher.ids)} tiles "
              "indexed)")
        print(format_hits(hits))
        if reranked:
            print("re-ranked by LightGlue matches: " + ", ".join(
                f"{v['z']}/{v['x']}/{v['y']} {v['matches']}" for v in reranked))
            best = reranked[0]
            print(f"best: tile {best['z']}/{best['x']}/{best['y']} (lat {best['lat']:.6f}, lon "
                  f"{best['lon']:.6f}) with {best['matches']} matches, retrieval rank "
                  f"{best['rank']}")
    return 0


def _reranked(cache, image: Path, hits) -> list[dict]:
    """The hits re-ranked by LightGlue matches with the image, as JSON-able rows."""
    from c10.features.preprocess import open_tile

    by_tile = {(h.z, h.x, h.y): h for h in hits}
    ranked = cache.reranker().rerank_hits(open_tile(image), hits)
    return [{"z": v.tile[0], "x": v.tile[1], "y": v.tile[2], "lat": by_tile[v.tile].lat,
             "lon": by_tile[v.tile].lon,
             "rank": by_tile[v.tile].rank, "score": v.similarity,
             "matches": v.matches} for v in ranked]


def cmd_selftest(args) -> int:
    from c10.query.search import selftest

    cache = open_flight_cache(args)
    searcher, model = cache.searcher(args.model)
    root = cache.root
    result = selftest(searcher, cache.load_tile, args.n, args.strength, args.seed)
    if args.json:
        print(json.dumps({"cache": str(root), "model": model, **result.to_json()}))
    else:
        print(f"c10 selftest: {result.n} tiles of {root} (model {model}), {result.strength} "
              f"perturbation, seed {result.seed}: recall@1 {result.recall_at_1:.3f}, recall@5 "
              f"{result.recall_at_5:.3f}")
    return 0
