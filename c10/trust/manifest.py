"""The Manifest: schema, canonical bytes, the control-file allowlist, and the signed write."""
from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import blake3

from c10.canonical import canonical_json
from c10.errors import ManifestWriteError, VerifyError
from c10.store import atomic
from c10.store.layout import COMMIT_MEMO, ENVELOPE_NAME, MANIFEST_NAME, STAGING_DIR, is_control
from c10.trust.strictjson import StrictJSONError, strict_loads
from c10.trust.tilelists import LIST_KIND, TREE_SCHEMA, check_root

# c10.trust.dsse (cryptography) is imported only to sign: a no-op build never does
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

# 2: the runtime spec (c10.trust.runtime) and a request without workstation paths. 3: a tree, the
# root lists one tile list per block instead of every tile (c10.trust.tilelists). A verifier reads
# 1 and 2 too (flat: their files and signature are checked the same way); 1 cannot be flown.
SCHEMA_VERSION = TREE_SCHEMA
READABLE_SCHEMAS = (1, 2, TREE_SCHEMA)
KINDS = frozenset({"tile", "model", "engine", "engine-meta", "shard", "index", "report",
                   LIST_KIND})

@dataclass(frozen=True, slots=True)
class FileEntry:
    """One shipped file: cache-relative POSIX path, size in bytes, blake3 hex, kind."""

    path: str
    size: int
    blake3: str
    kind: str

    def to_json(self) -> dict:
        return {"path": self.path, "size": self.size, "blake3": self.blake3, "kind": self.kind}


_BAD_CHARS = re.compile(r"[\x00-\x1f\\]")  # control characters and backslash
# One component: no '/', control character or backslash, and not '.' or '..'.
_COMPONENT = r"(?!\.\.?(?:/|$))[^/\x00-\x1f\\]+"
_SAFE_PATH = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")


def is_safe_path(relpath: object) -> bool:
    """Relative, normalized, no '..', no control characters: one regex (the verifier's hot path)."""
    return isinstance(relpath, str) and _SAFE_PATH.fullmatch(relpath) is not None


def path_problem(relpath: object) -> str | None:
    """Why `relpath` is not a safe cache-relative path, or None when it is."""
    if is_safe_path(relpath):
        return None
    if not isinstance(relpath, str) or not relpath:
        return "empty or not a string"
    if relpath.startswith("/"):
        return "absolute"
    if _BAD_CHARS.search(relpath):
        return "control character or backslash"
    if ".." in relpath.split("/"):
        return "contains '..'"
    return "not normalized"


# ---------------------------------------------------------------- build

def tiles_aggregate_hash(entries: Iterable[FileEntry]) -> str:
    """blake3 over the sorted (path, blake3) pairs of tile entries: one id for the tile set."""
    pairs = sorted((e.path, e.blake3) for e in entries if e.kind == "tile")
    return blake3.blake3(canonical_json(pairs)).hexdigest()


def build_manifest(
    *,
    version: int,
    issued_at: datetime,
    expires: datetime,
    build_identity: str,
    request: dict,
    host: dict,
    tools: dict,
    tiles_hash: str,
    files: Iterable[FileEntry],
    cache_id: str,
    engines: Iterable[dict] = (),
    runtime: dict | None = None,
    schema: int = SCHEMA_VERSION,
) -> dict:
    """The Manifest as a plain dict; refuses inputs the verifier would reject later. schema 2: the
    flat format, every tile in `files` (what verify still reads; tests and benchmarks write it)."""
    files = sorted(files, key=lambda e: e.path)
    engines = sorted((dict(e) for e in engines), key=lambda e: e.get("path", ""))
    _check_build_inputs(version, issued_at, expires, files, engines)
    if schema not in READABLE_SCHEMAS:
        raise ManifestWriteError(f"Manifest schema {schema!r}: this c10 writes "
                                 f"{', '.join(map(str, READABLE_SCHEMAS))}")
    return {
        "schema_version": schema,
        "cache_id": cache_id,
        "version": version,
        "issued_at": _iso(issued_at),
        "expires": _iso(expires),
        "build_identity": build_identity,
        "request": request,
        "host": host,
        "tools": tools,
        "tiles_hash": tiles_hash,
        "engines": engines,
        "files": [e.to_json() for e in files],
        **({"runtime": runtime} if runtime is not None else {}),
    }


def _check_build_inputs(version, issued_at, expires, files, engines) -> None:
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ManifestWriteError(f"Manifest version must be an integer >= 1, got {version!r}")
    if issued_at.tzinfo is None or expires.tzinfo is None:
        raise ManifestWriteError("Manifest issued_at/expires must be timezone-aware (UTC)")
    if expires <= issued_at:
        raise ManifestWriteError(f"Manifest would expire ({_iso(expires)}) before it is issued "
                                 f"({_iso(issued_at)}); raise signing.validity_days in c10.toml")
    _check_files(files)
    _check_engines(engines, {e.path for e in files})


def _check_files(files: list[FileEntry]) -> None:
    for prev, entry in zip([None, *files], files):
        problem = path_problem(entry.path) or ("control file" if is_control(entry.path) else None)
        if problem:
            raise ManifestWriteError(f"cannot list {entry.path!r} in the Manifest: {problem}; "
                                     f"this is a bug in the task that declared it")
        if prev is not None and prev.path == entry.path:
            raise ManifestWriteError(f"{entry.path} is declared twice; fix the duplicate task "
                                     "target")
        if entry.size < 0 or len(entry.blake3) != 64:
            raise ManifestWriteError(f"{entry.path}: bad size/blake3 in its FileEntry")


def _check_engines(engines: list[dict], listed: set[str]) -> None:
    for eng in engines:
        if eng.get("path") not in listed or not isinstance(eng.get("backend"), str):
            raise ManifestWriteError(f"engine entry {eng!r} needs a backend and a path that is "
                                     f"listed in the Manifest's files")


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime:
    """Parse a Manifest timestamp (always UTC, `...Z`)."""
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


# ---------------------------------------------------------------- bytes

def dumps_manifest(manifest: dict) -> bytes:
    """Canonical bytes: sorted keys, no spaces, UTF-8, files sorted by path, one trailing
    newline."""
    body = dict(manifest)
    body["files"] = sorted(manifest.get("files", ()), key=lambda f: f["path"])
    body["engines"] = sorted(manifest.get("engines", ()), key=lambda e: e["path"])
    try:
        return canonical_json(body) + b"\n"
    except (TypeError, ValueError) as exc:
        raise ManifestWriteError(f"Manifest is not canonical JSON ({exc}); the request or host "
                                 f"metadata holds a non-JSON value") from None


_REQUIRED = {"schema_version": int, "cache_id": str, "version": int, "issued_at": str,
             "expires": str, "build_identity": str, "tiles_hash": str, "engines": list,
             "files": list}


def loads_manifest(data: bytes) -> dict:
    """Parse and structurally check Manifest bytes; VerifyError(bad-manifest|schema-version)."""
    try:
        # no depth walk: the parser refuses what would exhaust the stack, and c10 reads only levels
        # it checks below (a 10^5-file Manifest parses in a fraction of the time)
        manifest = strict_loads(data, max_depth=None)
    except StrictJSONError as exc:
        raise _bad_manifest(f"not strict UTF-8 JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise _bad_manifest("not a JSON object")
    if manifest.get("schema_version") not in READABLE_SCHEMAS:
        raise VerifyError("schema-version", f"Manifest schema_version is "
                          f"{manifest.get('schema_version')!r}, this c10 reads "
                          f"{', '.join(map(str, READABLE_SCHEMAS))}; use the c10 release that "
                          f"built it or rebuild with `doit build_cache`", MANIFEST_NAME)
    _check_fields(manifest)
    return manifest


def _check_fields(manifest: dict) -> None:
    for name, kind in _REQUIRED.items():
        value = manifest.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise _bad_manifest(f"field {name!r} missing or not {kind.__name__}")
    try:
        parse_time(manifest["issued_at"]), parse_time(manifest["expires"])
    except ValueError:
        raise _bad_manifest("issued_at/expires are not YYYY-MM-DDTHH:MM:SSZ") from None
    paths = _entry_paths(manifest["files"])
    for eng in manifest["engines"]:
        if not isinstance(eng, dict) or eng.get("path") not in paths:
            raise _bad_manifest(f"engine entry {eng!r} is not a listed file")
    if manifest["schema_version"] >= TREE_SCHEMA:
        check_root(manifest)


def _entry_paths(files: list) -> set[str]:
    """Type-check every entry in one tight pass (100k entries); explain only on failure."""
    try:
        paths = {f["path"] for f in files if _entry_ok(f)}
    except (TypeError, KeyError):
        paths = set()
    if len(paths) == len(files):
        return paths
    bad = next((f for f in files if not _safe_entry_ok(f)), None)
    if bad is not None:
        raise _bad_manifest(f"file entry {bad!r} needs path, size >= 0, blake3 and kind")
    raise _bad_manifest("a file path is listed twice")


def _entry_ok(f: dict) -> bool:
    # type() is, not isinstance: a JSON bool must not pass as a size
    return (type(f["path"]) is str and type(f["size"]) is int and f["size"] >= 0
            and type(f["blake3"]) is str and type(f["kind"]) is str)


def _safe_entry_ok(f: object) -> bool:
    try:
        return _entry_ok(f)
    except (TypeError, KeyError):
        return False


def _bad_manifest(what: str) -> VerifyError:
    return VerifyError("bad-manifest", f"Manifest.json is malformed: {what}; rebuild with "
                       f"`doit build_cache`", MANIFEST_NAME)


# ---------------------------------------------------------------- write

def write_signed_manifest(cache_root: Path, manifest_bytes: bytes, key: Ed25519PrivateKey) -> None:
    """Sign `manifest_bytes` and write Manifest.json.dsse, THEN Manifest.json.

    Why envelope first: the envelope carries the whole signed payload, so it is the commit
    point. A kill between the two renames leaves (new envelope, old Manifest.json); the
    verifier requires payload == Manifest.json and rejects that pair (envelope-mismatch),
    so no mismatched state is ever accepted, and the newest signed version survives in the
    envelope, where next_version() reads it, so a version number is never signed twice
    with different bytes. (Manifest first would leave an unsigned new Manifest.json beside
    the old envelope: also rejected, but the newest version would then be unsigned.)
    The next build completes such a cut commit first thing under its lock (roll_forward).
    Both files are written and fsynced before the first rename: the cut can only fall between
    two back-to-back renames. Before either, the file system is synced: the shards, lists and
    tiles the payload names are durable before a signature names them (a build writes them
    without an fsync each).
    """
    try:  # never sign bytes the verifier would refuse to parse
        loads_manifest(manifest_bytes)
    except VerifyError as exc:
        raise ManifestWriteError(f"refusing to sign a Manifest the verifier would reject "
                                 f"({exc.reason}: {exc})", "this is a bug in c10: report it with "
                                 "the build's output", then="") from exc
    from c10.trust.dsse import PAYLOAD_TYPE, sign_envelope

    envelope = sign_envelope(manifest_bytes, PAYLOAD_TYPE, key)
    root = Path(cache_root)
    atomic.sync_filesystem(root)
    try:
        atomic.write_together([(root / ENVELOPE_NAME, canonical_json(envelope) + b"\n"),
                               (root / MANIFEST_NAME, manifest_bytes)], staging=root / STAGING_DIR)
    except OSError as exc:
        raise ManifestWriteError(f"cannot write the Manifest in {root}: {exc}",
                                 "free space or fix permissions") from None


def next_version(cache_root: Path) -> int:
    """Highest version in Manifest.json or the envelope's payload, + 1 (1 for a new cache)."""
    return previous_identity(cache_root)[0]


def previous_identity(cache_root: Path) -> tuple[int, str | None]:
    """(next version, previous cache id or None), reading each previous file once and parsing
    the pair once when they agree (the committed state)."""
    paths = (Path(cache_root) / MANIFEST_NAME, Path(cache_root) / ENVELOPE_NAME)
    raw = [_previous_bytes(paths[0], False), _previous_bytes(paths[1], True)]
    if raw[0] is not None and raw[0] == raw[1]:
        raw[1] = None
    found = [_parse_previous(path, data) for path, data in zip(paths, raw) if data is not None]
    if not found:
        return 1, None
    newest = max(found, key=lambda m: m["version"])
    return newest["version"] + 1, newest["cache_id"]


def _previous_bytes(path: Path, is_envelope: bool) -> bytes | None:
    """A previous Manifest's bytes (an envelope's payload), read without trusting it for anything
    but 'never go lower'."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _unreadable_previous(path, exc.strerror) from None
    if not is_envelope:
        return data
    from c10.trust.dsse import parse_envelope

    try:  # as strictly as the verifier parses it: both must see the same payload
        return parse_envelope(data, max_bytes=_ENVELOPE_MAX).payload
    except VerifyError as exc:
        raise _unreadable_previous(path, str(exc)) from None


def _parse_previous(path: Path, data: bytes) -> dict:
    try:
        return loads_manifest(data)
    except (VerifyError, ValueError, KeyError, TypeError) as exc:
        raise _unreadable_previous(path, str(exc)) from None


def _unreadable_previous(path: Path, why: str) -> ManifestWriteError:
    return ManifestWriteError(
        f"previous {path} is unreadable ({why}), so the next Manifest version is unknown and "
        f"aircraft would reject a lower one as a rollback; restore it from the copy on the "
        f"aircraft or a backup, or, to deliberately restart versioning, move it away "
        f"(`mv {path} {path}.bad`) and clear the aircraft's trusted state")


def roll_forward(cache_root: Path) -> int | None:
    """Finish a commit that a kill cut between its two renames; the version written, or None.

    write_signed_manifest renames the envelope first, then Manifest.json: a kill (or a failed
    write) in between leaves a newer signed payload beside an older or missing Manifest.json,
    a pair the verifier rejects (envelope-mismatch). Every file that payload lists was written
    before it was signed, so writing Manifest.json from it completes the commit the build
    meant. Call under the build lock. The signature is left to the verifier, as for any
    Manifest: this only copies signed bytes, it never makes an unsigned state acceptable.
    """
    root = Path(cache_root)
    if committed_intact(root):
        return None
    payload, newer = _envelope_payload(root / ENVELOPE_NAME)
    if payload is None:
        return None
    try:
        current = (root / MANIFEST_NAME).read_bytes()
    except FileNotFoundError:
        current = None
    if current is not None:
        if current == payload:
            return None
        try:
            old = loads_manifest(current)
        except VerifyError:
            return None  # not a commit we cut short: next_version() names the problem
        if old["version"] >= newer["version"] or old["cache_id"] != newer["cache_id"]:
            return None
    atomic.write_bytes(root / MANIFEST_NAME, payload, staging=root / STAGING_DIR)
    return newer["version"]


_ENVELOPE_MAX = 1 << 31  # the envelope of the largest Manifest c10 reads, with slack
_PAYLOAD_START = len(b'{"payload":"')  # canonical JSON sorts "payload" first


def committed_intact(root: Path, secret: bytes | None = None) -> bool:
    """Manifest.json is, byte for byte, the payload its envelope signs: a finished commit that
    nothing edited since (a torn one, a tampered, re-ordered or re-formatted Manifest.json all
    differ). Both files are read whole and the payload's base64 is compared, nothing is parsed
    as JSON (every build asks, a no-op included); the signature is left to the verifier. With
    this host's `secret`, a pair recorded intact (remembered_intact) is not read again."""
    return remembered_intact(root, secret) or _pair_intact(Path(root))


def remembered_intact(root: Path, secret: bytes | None) -> bool:
    """The pair's stat (inode, size, mtime, ctime) is the one record_intact kept under this host's
    `secret`: any write to either file since moves its ctime, which no user call sets back."""
    from c10.store.memo import read_authenticated  # not on the verifier's import path

    stats = _pair_stat(Path(root))
    return stats is not None and read_authenticated(Path(root) / COMMIT_MEMO, secret) == stats


def record_intact(root: Path, secret: bytes) -> str | None:
    """Record the pair's stat as intact (right after a commit, or a full check, under the build
    lock); why it could not be, or None. A failure only costs the next build one read."""
    from c10.store.memo import write_authenticated

    stats = _pair_stat(Path(root))
    if stats is None:
        return "the Manifest pair is missing"
    try:
        write_authenticated(Path(root) / COMMIT_MEMO, stats, secret)
    except OSError as exc:
        return str(exc)
    return None


def _pair_stat(root: Path) -> bytes | None:
    """The stat key of the Manifest pair, as the commit memo holds it; None if one is missing."""
    keys = []
    for name in (ENVELOPE_NAME, MANIFEST_NAME):
        try:
            st = (root / name).stat()
        except OSError:
            return None
        keys.append([st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns])
    return canonical_json({"pair": keys})


def _pair_intact(root: Path) -> bool:
    try:
        envelope = (root / ENVELOPE_NAME).read_bytes()
        manifest = (root / MANIFEST_NAME).read_bytes()
    except OSError:
        return False
    end = envelope.rfind(b'","payloadType":"')  # canonical JSON: the payload comes first
    if end < _PAYLOAD_START or not envelope.startswith(b'{"payload":"'):
        return False
    encoded = envelope[_PAYLOAD_START:end]
    return len(encoded) == 4 * -(-len(manifest) // 3) and base64.b64encode(manifest) == encoded


def _envelope_payload(path: Path) -> tuple[bytes | None, dict]:
    from c10.trust.dsse import PAYLOAD_TYPE, parse_envelope

    try:
        envelope = parse_envelope(path.read_bytes(), max_bytes=_ENVELOPE_MAX)
        if envelope.payload_type != PAYLOAD_TYPE:
            return None, {}
        return envelope.payload, loads_manifest(envelope.payload)
    except (OSError, VerifyError):
        return None, {}
