"""The `c10` command: one subcommand per operator task, each a thin call into the package."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

from c10.errors import C10Error, ConfigError, VerifyError


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except C10Error as exc:
        print(f"c10: {type(exc).__name__}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `c10 status DIR | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _parser() -> argparse.ArgumentParser:
    from c10 import __version__

    p = argparse.ArgumentParser(prog="c10",
                                description="Build and verify signed offline takeoff caches.")
    p.add_argument("--version", action="version", version=f"c10 {__version__}")
    sub = p.add_subparsers(metavar="COMMAND")
    cmd = sub.add_parser("init", help="write dodo.py and a commented c10.toml into DIR")
    cmd.add_argument("dir", type=Path)
    cmd.set_defaults(func=cmd_init)
    cmd = sub.add_parser("build", help="run `doit build_cache` in DIR (extra args go to doit)")
    cmd.add_argument("dir", type=Path)
    cmd.add_argument("doit_args", nargs=argparse.REMAINDER)
    cmd.set_defaults(func=cmd_build)
    cmd = sub.add_parser("demo", help="make and build a complete example cache in DIR")
    cmd.add_argument("dir", type=Path)
    cmd.add_argument("--tiles", type=int, default=300, help="about how many tiles (default 300)")
    cmd.add_argument("--key", type=Path, help="signing key to create/use (default: outside DIR)")
    cmd.add_argument("--backend", default="auto", help="engine backend (default auto)")
    cmd.add_argument("--real-models", action="store_true",
                     help="export pretrained ALIKED and LightGlue instead of generated networks "
                          "(needs c10[export])")
    cmd.add_argument("--keypoints", type=int, default=256,
                     help="local keypoints per tile with --real-models (default 256)")
    cmd.set_defaults(func=cmd_demo)
    cmd = sub.add_parser("verify",
                         help="check a cache as the aircraft does (exit 0 only if it is intact)")
    cmd.add_argument("dir", type=Path)
    cmd.add_argument("--trusted-keys", action="append", default=[], metavar="KEY",
                     help="public key file (PEM or ssh-ed25519) or 64-hex raw key; default: every "
                          "key in ~/.config/c10/trusted/ (never the cache's own c10.toml, which is "
                          "unsigned)")
    cmd.add_argument("--state", type=Path,
                     help="anti-rollback state file "
                          "(default: ~/.local/state/c10/verify-state.json)")
    cmd.add_argument("--now", help="ISO time to check expiry against (tests)")
    cmd.add_argument("--airborne", action="store_true", help="also check engines against this host")
    cmd.add_argument("--json", action="store_true", help="one JSON line for tools")
    cmd.set_defaults(func=cmd_verify)
    cmd = sub.add_parser("keygen", help="create an Ed25519 operator key (mode 0600)")
    cmd.add_argument("path", type=Path)
    cmd.add_argument("--passphrase-file", type=Path,
                     help="encrypt with the passphrase in this file")
    cmd.add_argument("--prompt", action="store_true", help="ask for a passphrase on the terminal")
    cmd.set_defaults(func=cmd_keygen)
    _operator_commands(sub)
    _query_commands(sub)
    _network_commands(sub)
    return p


def cmd_init(args) -> int:
    from c10.tools.project import init_cache

    skipped = init_cache(args.dir)
    for name in skipped:
        print(f"{args.dir / name} exists: left as it is")
    print(f"initialised {args.dir}: edit c10.toml, then `cd {args.dir} && doit build_cache`")
    return 0


def cmd_build(args) -> int:
    from c10.rules.driver import run_build

    return run_build(args.dir, [a for a in args.doit_args if a != "--"] or ["build_cache"])


def cmd_demo(args) -> int:
    from c10.rules.driver import run_build
    from c10.tools.demo import make_demo

    return make_demo(args.dir, run_build, tiles=args.tiles, key=args.key, backend=args.backend,
                     real_models=args.real_models, keypoints=args.keypoints)


def cmd_verify(args) -> int:
    from c10.trust.keys import load_trusted_keys
    from c10.trust.verify import verify_cache, verify_to_json

    root = args.dir.resolve()
    trusted = load_trusted_keys(args.trusted_keys or trust_store_keys())
    now = dt.datetime.fromisoformat(args.now) if args.now else dt.datetime.now(dt.timezone.utc)
    try:
        result = verify_cache(root, trusted=trusted, now=now,
                              state_path=args.state or default_state(),
                              airborne_fingerprints=_fingerprints() if args.airborne else None)
    except VerifyError as err:
        print(json.dumps(verify_to_json(err)) if args.json else "c10 verify: REJECTED "
                                                                f"({err.reason}): {err}")
        return verify_to_json(err)["exit_code"]
    print(json.dumps(verify_to_json(result)) if args.json else
          f"c10 verify: OK {root}: Manifest v{result.version}, {result.files} files, "
          f"{result.bytes / 1e6:.1f} MB checked in {result.elapsed:.2f} s")
    if result.pending and not args.json:
        print(f"c10 verify: note: {result.pending} shard/index file(s) of an unfinished build are "
              f"not in the Manifest (nothing loads them); the next `doit build_cache` in {root} "
              "commits or removes them")
    return 0


def trust_store() -> Path:
    """Where the aircraft (or an inspecting host) keeps the operator keys it trusts, outside any
    cache."""
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "c10" / "trusted"


def trust_store_keys() -> list[str]:
    """Every public key file in the trust store; a cache can never vouch for itself."""
    store = trust_store()
    keys = sorted(str(p) for p in store.glob("*") if p.is_file()) if store.is_dir() else []
    if not keys:
        raise ConfigError("no trusted keys: pass --trusted-keys KEY.pub or copy the operator's "
                          f"public key (`c10 keygen` writes KEY.pub) into {store}/")
    return keys


def default_state() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "c10" / "verify-state.json"


def _fingerprints() -> dict:
    """This host's fingerprint per available backend (what airborne mode compares engines with)."""
    from c10.features.backends import AUTO_ORDER, get_backend

    out = {}
    for name in AUTO_ORDER:
        try:
            out[name] = get_backend(name).host_fingerprint()
        except C10Error:
            continue  # not installed here: an engine of that backend cannot run on this host
    return out


def cmd_keygen(args) -> int:
    """Write PATH (private, 0600) and PATH.pub (public PEM for the aircraft's trust store)."""
    from c10.store import atomic
    from c10.trust.keys import generate_key, load_signing_key, public_key_pem, ssh_fingerprint

    passphrase = _read_passphrase(args)
    kid = generate_key(args.path, passphrase)
    key = load_signing_key(args.path, passphrase=passphrase, cache_root=None)
    pub = args.path.with_name(args.path.name + ".pub")
    atomic.write_bytes(pub, public_key_pem(key))
    print(f"wrote {args.path} (private, mode 0600) and {pub} (public)")
    print(f"keyid {kid}\nfingerprint {ssh_fingerprint(key)}")
    print(f"put `key = \"{args.path}\"` and `allowed_keyids = [\"{kid}\"]` under [signing] in "
          "c10.toml;")
    print(f"copy {pub} into {trust_store()}/ on the aircraft (or pass it to `c10 verify "
          "--trusted-keys`)")
    return 0


def _read_passphrase(args) -> bytes | None:
    """From --passphrase-file or a terminal prompt (twice); never from argv."""
    if args.passphrase_file:
        try:
            return args.passphrase_file.read_bytes().rstrip(b"\r\n") or None
        except OSError as exc:
            raise ConfigError(f"{args.passphrase_file}: cannot read the passphrase file "
                              f"({exc.strerror})") from None
    if not args.prompt:
        return None
    import getpass

    first = getpass.getpass("passphrase: ")
    if first != getpass.getpass("again: "):
        raise ConfigError("the two passphrases differ; run `c10 keygen` again")
    return first.encode() or None


def _operator_commands(sub) -> None:
    """status, map, import: the operator's questions before a flight."""
    cmd = sub.add_parser("status",
                         help="what `doit build_cache` would redo in DIR and why (writes nothing)")
    cmd.add_argument("dir", type=Path)
    cmd.add_argument("--json", action="store_true", help="the raw status as JSON for tools")
    cmd.set_defaults(func=cmd_status)
    cmd = sub.add_parser("map",
                         help="draw the requested area per zoom: tiles present, missing, rebuilt")
    cmd.add_argument("dir", type=Path)
    cmd.add_argument("-o", "--output", type=Path, default=Path("map.png"),
                     help="PNG to write (default map.png)")
    cmd.set_defaults(func=cmd_map)
    cmd = sub.add_parser("import",
                         help="copy tiles inside the request from an MBTiles file or a tile folder")
    cmd.add_argument("dir", type=Path)
    cmd.add_argument("source", type=Path,
                     help="a .mbtiles file (TMS rows) or a {z}/{x}/{y}.ext folder")
    cmd.add_argument("--tms", action="store_true", help="the folder counts y from the south (TMS)")
    cmd.add_argument("--replace", action="store_true",
                     help="overwrite cache tiles that differ from the source's")
    cmd.set_defaults(func=cmd_import)


def cmd_status(args) -> int:
    """Exit 0 when a build would change nothing, 1 when it would redo work."""
    from c10.rules.driver import build_status
    from c10.tools.status import render, would_change

    status = build_status(args.dir)
    print(json.dumps(status, indent=1) if args.json else render(status))
    return 1 if would_change(status) else 0


def cmd_map(args) -> int:
    from c10.tools.tilemap import LABELS, save_map

    result = save_map(args.dir, args.output)
    counts = {LABELS[c]: sum(p.counts[c] for p in result.panels.values()) for c in LABELS}
    print(f"wrote {args.output} ({result.image.width}x{result.image.height}): "
          + ", ".join(f"{n} {label}" for label, n in counts.items()))
    return 0


def cmd_import(args) -> int:
    """Exit 1 when tiles that differ were kept or could not be read (never silently)."""
    from c10.tools.importer import import_tiles, summary

    result = import_tiles(args.dir, args.source, tms=args.tms, replace=args.replace)
    print(summary(result, args.dir))
    return 1 if result.conflicts or result.invalid else 0


def _query_commands(sub) -> None:
    """query and selftest: the cache's own engine and index, as the aircraft will use them."""
    cmd = sub.add_parser("query",
                         help="embed IMAGE with DIR's own engine; print the top-k tiles with "
                              "lat/lon")
    cmd.add_argument("dir", type=Path)
    cmd.add_argument("image", type=Path)
    cmd.add_argument("-k", type=_positive, default=5, help="how many tiles (default 5)")
    cmd.add_argument("--model", help="global model to query (default: the first in c10.toml)")
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
    cmd.add_argument("-n", type=_positive, default=100, help="how many tiles (default 100)")
    cmd.add_argument("--strength", choices=("mild", "strong"), default="mild",
                     help="perturbation (default mild)")
    cmd.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    cmd.add_argument("--model", help="global model to test (default: the first in c10.toml)")
    cmd.add_argument("--json", action="store_true", help="one JSON object")
    cmd.set_defaults(func=cmd_selftest)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def cmd_query(args) -> int:
    from dataclasses import asdict

    from c10.query.open import open_searcher
    from c10.query.search import format_hits
    from c10.store.lock import require_cache_root

    searcher, model, root = open_searcher(require_cache_root(args.dir), args.model)
    hits = searcher.query_file(args.image, args.k)
    reranked = _reranked(root, args.image, hits) if args.rerank else None
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


def _reranked(root: Path, image: Path, hits) -> list[dict]:
    """The hits re-ranked by LightGlue matches with the image, as JSON-able rows."""
    from c10.features.preprocess import open_tile
    from c10.query.open import open_reranker

    by_tile = {(h.z, h.x, h.y): h for h in hits}
    ranked = open_reranker(root).rerank_hits(open_tile(image), hits)
    return [{"z": v.tile[0], "x": v.tile[1], "y": v.tile[2], "lat": by_tile[v.tile].lat,
             "lon": by_tile[v.tile].lon,
             "rank": by_tile[v.tile].rank, "score": v.similarity,
             "matches": v.matches} for v in ranked]


def cmd_selftest(args) -> int:
    from c10.query.open import open_searcher
    from c10.query.search import selftest
    from c10.store.lock import require_cache_root

    searcher, model, root = open_searcher(require_cache_root(args.dir), args.model)
    result = selftest(searcher, root, args.n, args.strength, args.seed)
    if args.json:
        print(json.dumps({"cache": str(root), "model": model, **result.to_json()}))
    else:
        print(f"c10 selftest: {result.n} tiles of {root} (model {model}), {result.strength} "
              f"perturbation, seed {result.seed}: recall@1 {result.recall_at_1:.3f}, recall@5 "
              f"{result.recall_at_5:.3f}")
    return 0


def _network_commands(sub) -> None:
    """export-models: the real networks from published weights."""
    from c10.tools.export import ALIKED_VARIANTS, DEFAULT_KEYPOINTS

    cmd = sub.add_parser("export-models",
                         help="write pretrained ALIKED (global, local) and ALIKED-LightGlue "
                                              "(matcher) as ONNX into DIR/models (needs "
                                              "c10[export])")
    cmd.add_argument("dir", type=Path)
    cmd.add_argument("--aliked", choices=ALIKED_VARIANTS, default="n16",
                     help="ALIKED variant (default n16)")
    cmd.add_argument("--keypoints", type=int, default=DEFAULT_KEYPOINTS,
                     help="keypoints per image of the local model and the matcher (default "
                          f"{DEFAULT_KEYPOINTS})")
    cmd.add_argument("--deform", choices=("auto", "native", "grid"), default="auto",
                     help="deformable convs as ONNX DeformConv (onnxruntime only, fastest there) "
                          "or as GridSample + 1x1 Conv (every backend); auto: what DIR's "
                          "engines.backend runs")
    cmd.add_argument("--force", action="store_true",
                     help="replace model files that differ from this export")
    cmd.set_defaults(func=cmd_export_models)


def cmd_export_models(args) -> int:
    from c10.store.lock import require_cache_root
    from c10.tools.export import MATCHER_VARIANTS, export_models, models_toml

    root = require_cache_root(args.dir)
    export_models(root, aliked=args.aliked, keypoints=args.keypoints, deform=args.deform,
                  force=args.force)
    print("\nc10.toml tables for these networks (replace the [models.*] tables in "
          f"{root / 'c10.toml'}):\n")
    print(models_toml(args.keypoints, matcher=args.aliked in MATCHER_VARIANTS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
