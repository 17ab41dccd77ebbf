"""`c10` subcommands of the ground: init, build, demo, status, map, import, export-models."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub) -> None:
    cmd = sub.add_parser("init", help="write dodo.py and a commented c10.toml into DIR "
                                      "(created if missing)")
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
    cmd.add_argument("--stride", choices=("1", "0.5"),
                     help="shards.stride: 0.5 adds retrieval windows at half-tile offsets, so "
                          "camera frames that straddle tiles localize (default: 0.5 with "
                          "--real-models, 1 otherwise)")
    cmd.set_defaults(func=cmd_demo)
    _operator_commands(sub)
    _network_commands(sub)


def cmd_init(args) -> int:
    from c10.tools.project import init_cache

    created = not args.dir.exists()
    skipped = init_cache(args.dir)
    if created:
        print(f"created {args.dir.resolve()}")
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
                     real_models=args.real_models, keypoints=args.keypoints,
                     stride=float(args.stride) if args.stride else None)


def _operator_commands(sub) -> None:
    """status, map, import: the operator's questions before a flight."""
    cmd = sub.add_parser("status",
                         help="what `doit build_cache` would redo in DIR and why (writes nothing)")
    cmd.add_argument("dir", type=Path)
    cmd.add_argument("--json", action="store_true", help="the raw status as JSON for tools")
    cmd.add_argument("--full", action="store_true",
                     help="stat and check every tile, not only the columns whose directory "
                          "changed: sees a tile rewritten in place (as C10_FULL_STAT=1 makes a "
                          "build do)")
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

    status = build_status(args.dir, full=args.full)
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
    """Exit 1 when tiles that differ were kept or could not be read, or when the folder looks like
    the other y convention (--tms given or missing): never silently."""
    from c10.tools.importer import import_tiles, summary

    result = import_tiles(args.dir, args.source, tms=args.tms, replace=args.replace)
    print(summary(result, args.dir))
    return 1 if result.conflicts or result.invalid or result.looks_flipped else 0


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
                     help="replace model files that differ from this export, and [models.*] "
                          "tables of c10.toml edited by hand")
    cmd.set_defaults(func=cmd_export_models)


def cmd_export_models(args) -> int:
    """Export the networks, then write their [models.*] tables into DIR/c10.toml. A table edited
    by hand is refused (with its diff) before anything is exported, unless --force."""
    import sys

    from c10.store.layout import CONFIG_NAME
    from c10.store.lock import require_cache_root
    from c10.tools.export import MATCHER_VARIANTS, export_models, models_toml
    from c10.tools.export.tables import plan_models_tables, refusal, write_models_tables

    root = require_cache_root(args.dir)
    config = root / CONFIG_NAME
    tables = models_toml(args.keypoints, matcher=args.aliked in MATCHER_VARIANTS)

    def plan(show: bool = True):
        # an n16/n32 export's tables are ours too (t16 removes the matcher table they wrote)
        update = plan_models_tables(config, tables, known=[models_toml(args.keypoints)],
                                    force=args.force)
        if update.refused():
            print(update.diff(), end="", file=sys.stderr)
            raise refusal(update)
        if update.edited and show:  # --force: what it replaces
            print(update.diff(), end="")
        return update

    if config.is_file():
        plan(show=False)  # minutes of export only for tables that can be written
    export_models(root, aliked=args.aliked, keypoints=args.keypoints, deform=args.deform,
                  force=args.force)
    if not config.is_file():
        print(f"\nno {config} to write these tables into: run `c10 init {root}`, then "
              "`c10 export-models` again (or paste them into c10.toml):\n")
        print(tables)
        return 0
    update = plan()
    write_models_tables(update)
    print(update.summary())
    return 0
