"""`c10` subcommands of trust: verify (what the aircraft runs) and keygen."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

from c10.errors import ConfigError, TrustedKeyError, VerifyError


def register(sub) -> None:
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
    cmd.add_argument("--now", type=_iso_time,
                     help="ISO time to verify at instead of this host's clock (tests); like the "
                          "clock, it moves the state's time floor")
    cmd.add_argument("--area", metavar="NAME",
                     help="refuse a cache not signed for this sector (its area.name)")
    cmd.add_argument("--airborne", action="store_true", help="also check engines against this host")
    cmd.add_argument("--json", action="store_true", help="one JSON line for tools")
    cmd.set_defaults(func=cmd_verify)
    cmd = sub.add_parser("keygen", help="create an Ed25519 operator key (mode 0600)")
    cmd.add_argument("path", type=Path)
    cmd.add_argument("--passphrase-file", type=Path,
                     help="encrypt with the passphrase in this file")
    cmd.add_argument("--prompt", action="store_true", help="ask for a passphrase on the terminal")
    cmd.set_defaults(func=cmd_keygen)


def cmd_verify(args) -> int:
    """One verdict, whatever happens: with --json exactly one JSON line (ASCII), else lines whose
    every name from the cache is escaped (c10.trust.printable); the exit code of its reason."""
    from c10.trust.verify import VerifyResult, internal_error, verify_to_json

    try:
        root, outcome = _verify(args)
    except VerifyError as err:
        root, outcome = None, err
    except Exception as exc:  # RecursionError, MemoryError, UnicodeError, a bug: still a verdict
        root, outcome = None, internal_error(exc)
    line = verify_to_json(outcome)
    if args.json:
        print(json.dumps(line, ensure_ascii=True))
    elif isinstance(outcome, VerifyResult):
        first = ("; first use: no state for this cache before, so it is trusted on first use "
                 "(from now on an older one is refused)" if outcome.first_use else "")
        _say(f"c10 verify: OK {root}: {f'area {outcome.area}, ' if outcome.area else ''}"
             f"Manifest v{outcome.version}, {outcome.files} files, {outcome.bytes / 1e6:.1f} MB "
             f"checked in {outcome.elapsed:.2f} s{first}")
        if outcome.pending:
            _say(f"c10 verify: note: {outcome.pending} shard/index file(s) of an unfinished build "
                 f"are not in the Manifest (nothing loads them); the next `doit build_cache` in "
                 f"{root} commits or removes them")
        if outcome.out_of_scope:
            _say(f"c10 verify: note: {outcome.out_of_scope} tile(s) in tiles/ outside the signed "
                 f"area are inputs kept for another request: not in the Manifest, never loaded, "
                 f"not in the flight image (`c10 pack`)")
    else:
        _say(f"c10 verify: REJECTED ({outcome.reason}): {outcome}")
    return line["exit_code"]


def _verify(args):
    from c10.trust.keys import load_trusted_keys
    from c10.trust.verify import verify_cache

    root = args.dir.resolve()
    entries = args.trusted_keys or trust_store_keys()
    if not entries:
        raise VerifyError("no-trusted-keys", "no trusted keys, so nothing can be verified: pass "
                          "--trusted-keys KEY.pub or copy the operator's public key (`c10 keygen` "
                          f"writes KEY.pub) into {trust_store()}/ (never a key the cache names: "
                          "c10.toml is unsigned)")
    try:
        trusted = load_trusted_keys(entries)
    except TrustedKeyError as err:
        raise VerifyError("bad-trusted-key", str(err)) from None
    from c10.features.backends import host_fingerprints

    now = args.now or dt.datetime.now(dt.timezone.utc)
    return root, verify_cache(root, trusted=trusted, now=now,
                              state_path=args.state or default_state(), area=args.area,
                              airborne_fingerprints=host_fingerprints() if args.airborne else None)


def _say(text: str) -> None:
    """One line on stdout, nothing raw a terminal could act on (names come from the cache)."""
    from c10.trust.printable import printable

    print(printable(text, getattr(sys.stdout, "encoding", None)))


def _iso_time(text: str) -> dt.datetime:
    """argparse type of --now: an ISO 8601 time (without a zone: UTC)."""
    try:
        return dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None


def trust_store() -> Path:
    """Where the aircraft (or an inspecting host) keeps the operator keys it trusts, outside any
    cache."""
    from c10.store.host import trust_store_dir

    return trust_store_dir()


def trust_store_keys() -> list[str]:
    """Every public key file in the trust store (none: an empty list); a cache can never vouch
    for itself."""
    store = trust_store()
    return sorted(str(p) for p in store.glob("*") if p.is_file()) if store.is_dir() else []


def default_state() -> Path:
    from c10.store.host import state_dir

    return state_dir() / "verify-state.json"


def cmd_keygen(args) -> int:
    """Write PATH (private, 0600) and PATH.pub (public PEM for the aircraft's trust store)."""
    from c10.store import atomic
    from c10.trust.keys import generate_key, load_signing_key, public_key_pem, ssh_fingerprint

    passphrase = _read_passphrase(args)
    # absolute: c10.toml resolves a relative signing.key against the cache, not this directory
    path = Path(os.path.abspath(os.path.expanduser(args.path)))
    kid = generate_key(path, passphrase)
    key = load_signing_key(path, passphrase=passphrase, cache_root=None)
    pub = path.with_name(path.name + ".pub")
    atomic.write_bytes(pub, public_key_pem(key))
    print(f"wrote {path} (private, mode 0600) and {pub} (public)")
    print(f"keyid {kid}\nfingerprint {ssh_fingerprint(key)}")
    print(f"put `key = \"{path}\"` and `allowed_keyids = [\"{kid}\"]` under [signing] in "
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
