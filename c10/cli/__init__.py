"""The `c10` command: one subcommand per operator task, each a thin call into the package."""
from __future__ import annotations

import argparse
import os
import sys

from c10.errors import C10Error


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
    from c10.cli import cache, flight, query, trust

    p = argparse.ArgumentParser(prog="c10",
                                description="Build and verify signed offline takeoff caches.")
    p.add_argument("--version", action="version", version=f"c10 {__version__}")
    sub = p.add_subparsers(metavar="COMMAND")
    cache.register(sub)
    trust.register(sub)
    flight.register(sub)
    query.register(sub)
    return p


def positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)
