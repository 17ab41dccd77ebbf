"""`c10 verify DIR`: what the aircraft runs before takeoff; first failure wins, one reason each."""
from __future__ import annotations

import errno
import json
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import blake3
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from c10.canonical import digest as key_digest
from c10.errors import VerifyError
from c10.store import atomic
from c10.store.digest import MMAP_MIN, hash_fd, read_fd
from c10.store.layout import (
    CONTROL_DIR,
    CONTROL_FILES,
    ENGINE_NAME,
    ENGINES_DIR,
    ENVELOPE_NAME,
    MANIFEST_NAME,
    is_control,
    split_tagged,
)
from c10.trust.dsse import verify_envelope_signers
from c10.trust.manifest import is_safe_path, loads_manifest, parse_time, path_problem

# Stable: scripts and the aircraft's arming logic branch on these. Never renumber.
EXIT_CODES: dict[str, int] = {
    "ok": 0,
    "missing-manifest": 10, "bad-envelope": 11, "bad-payload-type": 12, "no-trusted-keys": 13,
    "unknown-key": 14, "bad-signature": 15, "threshold": 16,
    "envelope-mismatch": 20, "bad-manifest": 21, "schema-version": 22,
    "rollback": 30, "version-reuse": 31, "bad-state": 32,
    "expired": 40,
    "bad-path": 50, "missing-file": 51, "symlink": 52, "special-file": 53, "hardlink": 54,
    "size-mismatch": 55, "hash-mismatch": 56, "unreadable": 57,
    "extra-file": 60,
    "platform-mismatch": 70,
}
_CONTROL_MAX = 1 << 30  # a 1M-file Manifest is ~200 MB; refuse to slurp anything larger
HASH_THREADS = min(2, os.cpu_count() or 1)
_CHUNK = 256  # files per worker task: amortizes executor overhead, keeps failures local
# Never follow a planted symlink; never block on a FIFO planted in a file's place.
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# Every control path is one of these or starts with one (a cheap pre-filter for is_control).
_MAYBE_CONTROL = tuple(CONTROL_FILES) + (CONTROL_DIR + "/",)
_REBUILD = "rebuild on the build host with `doit build_cache` and copy the cache again"


@dataclass(frozen=True)
class VerifyResult:
    """A cache that passed every check."""

    cache_id: str
    version: int
    files: int
    bytes: int
    keyid: str
    elapsed: float
    state_updated: bool = False
    pending: int = 0  # content-named files of an unfinished build, listed by no Manifest yet


@dataclass
class _Tree:
    """One no-follow walk of the cache: regular files, symlinks and special files by relpath."""

    files: set[str] = field(default_factory=set)
    symlinks: list[str] = field(default_factory=list)
    specials: list[str] = field(default_factory=list)


def verify_cache(
    cache_root: Path,
    *,
    trusted: dict[str, Ed25519PublicKey],
    now: datetime,
    state_path: Path | None,
    airborne_fingerprints: dict | None = None,
    threshold: int = 1,
) -> VerifyResult:
    """Check the cache in the documented order; raise VerifyError at the first failure.

    `now` without a timezone is taken as UTC. `state_path` None skips the rollback check
    (a ground tool inspecting a copy); the aircraft always passes its state file.
    """
    start = time.perf_counter()
    try:
        return _verify(Path(cache_root), trusted, now, state_path, airborne_fingerprints,
                       threshold, start)
    except VerifyError as err:
        err.exit_code = EXIT_CODES.get(err.reason, 1)
        raise


def _verify(root, trusted, now, state_path, airborne, threshold, start) -> VerifyResult:
    payload, signers = _check_signature(root, trusted, threshold)
    _check_payload_matches(root, payload)
    manifest = loads_manifest(payload)
    state = _check_rollback(manifest, payload, state_path)
    _check_expiry(manifest, now)
    total, tree = _check_files(root, manifest["files"])
    pending = _check_coverage(root, tree, {f["path"] for f in manifest["files"]})
    if airborne is not None:
        _check_platform(manifest["engines"], airborne)
    updated = _record_state(state_path, state, manifest, payload, signers)
    return VerifyResult(manifest["cache_id"], manifest["version"], len(manifest["files"]),
                        total, ",".join(signers), time.perf_counter() - start, updated, pending)


# ---------------------------------------------------------------- 1-2: envelope

def _check_signature(root: Path, trusted, threshold) -> tuple[bytes, tuple[str, ...]]:
    if not trusted:
        raise VerifyError("no-trusted-keys", "no trusted keys given, so nothing can be verified; "
                          "pass --trusted-keys FILE or copy the operator's public key into "
                          "~/.config/c10/trusted/ (never trust a key the cache names: c10.toml is "
                          "unsigned)")
    raw = _read_control(root, ENVELOPE_NAME)
    try:
        envelope = json.loads(raw)
    except ValueError:
        raise VerifyError("bad-envelope", f"{ENVELOPE_NAME} is not JSON; {_REBUILD}",
                          ENVELOPE_NAME) from None
    return verify_envelope_signers(envelope, trusted, threshold)


def _check_payload_matches(root: Path, payload: bytes) -> None:
    if _read_control(root, MANIFEST_NAME) != payload:
        raise VerifyError("envelope-mismatch", f"{MANIFEST_NAME} differs from the payload "
                          f"signed in {ENVELOPE_NAME} (edited, or a build was killed between "
                          f"the two writes); {_REBUILD}", MANIFEST_NAME)


def _read_control(root: Path, name: str) -> bytes:
    """Read a root control file without following a symlink planted in its place."""
    try:
        data = _read_regular(root / name, _CONTROL_MAX)
    except OSError as exc:
        raise _open_failure(name, exc) from None
    if data is None:
        raise VerifyError("special-file", f"{name} is not a regular file of sane size; {_REBUILD}",
                          name)
    return data


def _open_failure(rel: str, exc: OSError) -> VerifyError:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        reason = "missing-manifest" if rel in (MANIFEST_NAME, ENVELOPE_NAME) else "missing-file"
        return VerifyError(reason, f"{rel} is missing; {_REBUILD}", rel)
    if exc.errno == errno.ELOOP:
        return VerifyError("symlink", f"{rel} is a symlink; caches hold only regular files: "
                           f"{_REBUILD}", rel)
    return VerifyError("unreadable", f"cannot read {rel}: {exc.strerror}; check the medium and "
                       f"permissions (`ls -l {rel}`)", rel)


# ---------------------------------------------------------------- 3-4: freshness

def _check_rollback(manifest: dict, payload: bytes, state_path: Path | None) -> dict:
    """Like a TUF client: never accept a version below (or a reused one beside) the highest seen."""
    if state_path is None:
        return {}
    state = _load_state(Path(state_path))
    seen = state.get("caches", {}).get(manifest["cache_id"])
    if not seen:
        return state
    version, digest = manifest["version"], blake3.blake3(payload).hexdigest()
    if version < seen["version"]:
        raise VerifyError("rollback", f"Manifest version {version} is older than version "
                          f"{seen['version']} already verified for cache {manifest['cache_id']} "
                          f"(state {state_path}); copy the current cache, or {_REBUILD}",
                          MANIFEST_NAME)
    if version == seen["version"] and digest != seen["manifest_blake3"]:
        raise VerifyError("version-reuse", f"Manifest version {version} differs from the version "
                          f"{version} already verified (state {state_path}); a signer reused a "
                          f"version number: {_REBUILD}", MANIFEST_NAME)
    return state


def _load_state(path: Path) -> dict:
    try:
        state = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {"format": 1, "caches": {}}
    except (OSError, ValueError) as exc:
        raise _bad_state(path, str(exc)) from None
    caches = state.get("caches") if isinstance(state, dict) else None
    if not isinstance(caches, dict) or not all(_state_entry_ok(v) for v in caches.values()):
        raise _bad_state(path, "unexpected structure")
    return state


def _state_entry_ok(entry: object) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("version"), int)
            and isinstance(entry.get("manifest_blake3"), str))


def _bad_state(path: Path, why: str) -> VerifyError:
    # Fail closed: resetting the state silently would re-open every rollback.
    return VerifyError("bad-state", f"trusted state {path} is unreadable ({why}); restore it "
                       f"from backup, or delete it to trust the next verified cache afresh "
                       f"(`rm {path}`)", str(path))


def _check_expiry(manifest: dict, now: datetime) -> None:
    now = now if now.tzinfo else now.replace(tzinfo=timezone.utc)
    expires = parse_time(manifest["expires"])
    if now >= expires:
        raise VerifyError("expired", f"Manifest expired at {manifest['expires']} (now "
                          f"{now.astimezone(timezone.utc):%Y-%m-%dT%H:%M:%SZ}); re-sign a fresh "
                          f"Manifest with `doit build_cache` and copy it", MANIFEST_NAME)


def _record_state(state_path, state, manifest, payload, signers) -> bool:
    """Persist the highest version only after every check passed."""
    if state_path is None:
        return False
    caches = state.setdefault("caches", {})
    seen = caches.get(manifest["cache_id"])
    if seen and seen["version"] >= manifest["version"]:
        return False
    caches[manifest["cache_id"]] = {
        "version": manifest["version"], "manifest_blake3": blake3.blake3(payload).hexdigest(),
        "keyid": ",".join(signers), "expires": manifest["expires"]}
    data = json.dumps(state, sort_keys=True, indent=1).encode() + b"\n"
    try:
        atomic.write_bytes(state_path, data, mode=0o600)
    except OSError as exc:  # unrecorded, a later rollback to this version would pass: fail
        raise _bad_state(Path(state_path), f"cannot write it: {exc.strerror}") from None
    return True


# ---------------------------------------------------------------- 5-6: files and tree

def _walk(root: Path) -> _Tree:
    """Iterative os.scandir walk that never follows a symlink (d_type: no stat per entry).

    Control files are kept out of `files`, so `files - listed` is exactly the extra files.
    """
    tree, stack = _Tree(), [("", str(root))]
    while stack:
        prefix, directory = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except OSError as exc:
            raise _open_failure(prefix.rstrip("/") or ".", exc) from None
        _classify(tree, stack, prefix, entries)
    return tree


def _classify(tree: _Tree, stack: list, prefix: str, entries: list[os.DirEntry]) -> None:
    files = tree.files
    # Control files live only at the top level and in .c10/.
    controls_here = not prefix
    for entry in entries:
        rel = prefix + entry.name
        if entry.is_file(follow_symlinks=False):  # most entries: one d_type test
            if not (controls_here and is_control(rel)):
                files.add(rel)
        elif entry.is_dir(follow_symlinks=False):
            if rel != CONTROL_DIR:  # the build's private dir is never shipped nor read here
                stack.append((rel + "/", entry.path))
        elif entry.is_symlink():
            tree.symlinks.append(rel)
        else:
            tree.specials.append(rel)


def _check_files(root: Path, files: list[dict]) -> tuple[int, _Tree]:
    """Step 5: every path is checked before any file is opened; then two threads open, stat
    and hash in path-ordered chunks while this thread walks the tree for step 6 (the walk
    overlaps the hashing). The first failure in path order is raised."""
    for entry in files:
        rel = entry["path"]
        if not is_safe_path(rel) or (rel.startswith(_MAYBE_CONTROL) and is_control(rel)):
            raise VerifyError("bad-path", f"Manifest lists unsafe path {rel!r} "
                              f"({path_problem(rel) or 'control file'}); the Manifest is "
                              f"refused: {_REBUILD}", str(rel))
    base = str(root) + os.sep
    chunks = [files[i:i + _CHUNK] for i in range(0, len(files), _CHUNK)]
    with ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:
        pending = pool.map(lambda chunk: _hash_chunk(base, chunk), chunks)
        tree = _walk(root)
        results = list(pending)
    for failure, _ in results:
        if failure is not None:
            raise failure
    return sum(size for _, size in results), tree


def _hash_chunk(base: str, chunk: list[dict]) -> tuple[VerifyError | None, int]:
    """Runs on a worker thread: returns the chunk's first failure instead of raising."""
    total = 0
    for entry in chunk:
        try:
            total += _check_content(base, entry)
        except VerifyError as err:
            return err, total
    return None, total


def _check_content(base: str, entry: dict) -> int:
    """The hot loop (100k files): one open, one fstat, one read, one hash per file."""
    rel, size = entry["path"], entry["size"]
    try:
        fd = os.open(base + rel, _OPEN_FLAGS)
    except OSError as exc:
        raise _open_failure(rel, exc) from None
    try:
        st = os.fstat(fd)  # of the very file we hash: a swap after the walk cannot slip past
        if st.st_nlink != 1 or st.st_size != size or not stat.S_ISREG(st.st_mode):
            _check_stat(rel, st, size)
        if size < MMAP_MIN:  # hash_fd inlined: this line runs 100k times
            data = os.read(fd, size + 1)
            digest = (blake3.blake3(data).hexdigest() if len(data) == size
                      else hash_fd(fd, size, data))
        else:
            digest = hash_fd(fd, size)
    except OSError as exc:
        raise _open_failure(rel, exc) from None
    finally:
        os.close(fd)
    if digest != entry["blake3"]:
        raise VerifyError("hash-mismatch", f"{rel}: blake3 differs from the Manifest (corrupted "
                          f"or replaced); {_REBUILD}", rel)
    return size


def _check_stat(rel: str, st: os.stat_result, size: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise VerifyError("special-file", f"{rel} is not a regular file: {_REBUILD}", rel)
    if st.st_nlink != 1:
        raise VerifyError("hardlink", f"{rel} has {st.st_nlink} hard links; a file shared with "
                          f"another place can change behind the Manifest: copy the cache "
                          f"without hard links (`cp -r`, not `cp -al`)", rel)
    if st.st_size != size:
        raise VerifyError("size-mismatch", f"{rel} is {st.st_size} bytes, the Manifest says "
                          f"{size} (truncated or extended); {_REBUILD}", rel)


# ---------------------------------------------------------------- 6-7: coverage, platform

def _check_coverage(root: Path, tree: _Tree, listed: set[str]) -> int:
    """Exactly the listed files plus control files plus pending files; no symlink or special file
    anywhere. Returns the number of pending files."""
    if tree.symlinks:
        rel = sorted(tree.symlinks)[0]
        raise VerifyError("symlink", f"{rel} is a symlink; caches hold no symlinks (not even to "
                          f"directories): remove it (`rm {rel}`) or {_REBUILD}", rel)
    if tree.specials:
        rel = sorted(tree.specials)[0]
        raise VerifyError("special-file", f"{rel} is a FIFO, device or socket; remove it "
                          f"(`rm {rel}`)", rel)
    unlisted = sorted(tree.files - listed)
    extra = [rel for rel in unlisted if not is_pending(root, rel)]
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise VerifyError("extra-file", f"{extra[0]}{more} not listed in the Manifest; remove "
                          f"(`rm {extra[0]}`), or {_REBUILD}", extra[0])
    return len(unlisted)


def is_pending(root: Path, rel: str) -> bool:
    """A file a build wrote beside the committed ones before it was stopped (or before it removed
    them after its commit), which proves itself, so no Manifest is needed to know it is c10's own
    and nothing loads it: a shard or index file named by the blake3 of its bytes; an engine
    sidecar named by the hash of the key material it holds; an engine whose sidecar records its
    blake3. Anything else unlisted is an extra file."""
    split = split_tagged(rel)
    if split is not None:
        digest = _regular_file_hash(root / rel)
        return digest is not None and digest.startswith(split[1])
    in_engines = rel.startswith(ENGINES_DIR + "/")
    engine = ENGINE_NAME.match(rel.removeprefix(ENGINES_DIR + "/")) if in_engines else None
    if engine is None:  # (the name pattern has no "/": engines/ holds no subdirectories)
        return False
    sidecar = _engine_sidecar(root / ENGINES_DIR / f"{engine['model']}-{engine['key']}.json",
                              engine["key"])
    if sidecar is None or engine["ext"] == "json":
        return sidecar is not None
    return sidecar.get("engine_blake3") == _regular_file_hash(root / rel)


def _engine_sidecar(path: Path, key: str) -> dict | None:
    """A sidecar whose key material hashes to `key` (the name it carries), else None."""
    try:
        data = json.loads(_read_regular(path, _CONTROL_MAX) or b"")
        material_key = key_digest(data["material"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    ok = data.get("key") == key == material_key
    return data if ok else None


def _regular_file_hash(path: Path) -> str | None:
    """blake3 of a regular, singly linked file, opened without following symlinks; None
    otherwise."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        return hash_fd(fd, st.st_size) if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 else None
    except OSError:
        return None
    finally:
        os.close(fd)


def _read_regular(path: Path, limit: int) -> bytes | None:
    """A regular file's bytes, None if it is not one or holds more than `limit`; opened without
    following a symlink or blocking on a FIFO (open errors are raised)."""
    fd = os.open(path, _OPEN_FLAGS)
    try:
        st = os.fstat(fd)
        return read_fd(fd, st.st_size) if stat.S_ISREG(st.st_mode) and st.st_size <= limit else None
    finally:
        os.close(fd)


def _check_platform(engines: list[dict], airborne: dict) -> None:
    for eng in engines:
        backend, want = eng.get("backend"), eng.get("fingerprint")
        have = airborne.get(backend)
        if have != want:
            raise VerifyError("platform-mismatch", f"{eng.get('path')} was built for {backend} "
                              f"fingerprint {want!r}, this host is {have!r}; build the cache on "
                              f"this platform with `doit build_cache`", eng.get("path"))


def verify_to_json(outcome: VerifyResult | VerifyError) -> dict:
    """The `--json` line: ok + figures, or reason, message, path and exit code."""
    if isinstance(outcome, VerifyResult):
        return {"ok": True, "exit_code": 0, **asdict(outcome)}
    return {"ok": False, "reason": outcome.reason, "message": str(outcome),
            "path": outcome.path, "exit_code": EXIT_CODES.get(outcome.reason, 1)}
