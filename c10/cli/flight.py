"""`c10` subcommands of the flight image: pack (the image that is carried to the aircraft)."""
from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

from c10.errors import TrustedKeyError, VerifyError


def register(sub) -> None:
    cmd = sub.add_parser("pack", help="write the flight image of a verified cache: exactly the "
                                      "files its Manifest lists and the Manifest pair")
    cmd.add_argument("dir", type=Path, help="the cache (build workspace)")
    cmd.add_argument("out", type=Path, help="the image directory to create (must not exist)")
    cmd.add_argument("--trusted-keys", action="append", default=[], metavar="KEY",
                     help="public key file (PEM or ssh-ed25519) or 64-hex raw key; default: every "
                          "key in ~/.config/c10/trusted/ (never the cache's own c10.toml)")
    cmd.add_argument("--state", type=Path,
                     help="anti-rollback state file, only read "
                          "(default: ~/.local/state/c10/verify-state.json)")
    cmd.add_argument("--now", type=_iso_time, help="ISO time to check expiry against (tests)")
    cmd.set_defaults(func=cmd_pack)


def cmd_pack(args) -> int:
    """Pack, or say why not: a refused cache exits with verify's code for the reason."""
    from c10.cli.trust import default_state, trust_store, trust_store_keys
    from c10.tools.pack import exit_code, pack
    from c10.trust.keys import load_trusted_keys

    try:
        entries = args.trusted_keys or trust_store_keys()
        if not entries:
            raise VerifyError("no-trusted-keys", "no trusted keys, so nothing can be verified: "
                              "pass --trusted-keys KEY.pub or copy the operator's public key into "
                              f"{trust_store()}/")
        try:
            trusted = load_trusted_keys(entries)
        except TrustedKeyError as err:
            raise VerifyError("bad-trusted-key", str(err)) from None
        result = pack(args.dir.resolve(), args.out, trusted=trusted,
                      now=args.now or dt.datetime.now(dt.timezone.utc),
                      state_path=args.state or default_state(),
                      progress=lambda line: print(f"c10 pack: {line}", flush=True))
    except VerifyError as err:
        print(f"c10 pack: REFUSED ({err.reason}): {err}; nothing was written at {args.out}",
              file=sys.stderr)
        return exit_code(err)
    for leftover in result.removed:
        print(f"c10 pack: removed {leftover}, the temporary image of a killed c10 pack")
    print(f"c10 pack: wrote {result.out}: Manifest v{result.version}, {result.files} files and "
          f"the Manifest pair, {result.bytes / 1e6:.1f} MB, verified as a flight image in "
          f"{result.elapsed:.2f} s; on the aircraft run `c10 verify {result.out} --airborne`")
    return 0


def _iso_time(text: str) -> dt.datetime:
    """argparse type of --now: an ISO 8601 time (without a zone: UTC)."""
    try:
        return dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
