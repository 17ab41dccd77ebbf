"""The cache tree as the verifier sees it: one no-follow walk, the listed files hashed."""
from __future__ import annotations

import json
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import blake3

from c10.canonical import digest as key_digest
from c10.errors import VerifyError
from c10.store.digest import MMAP_MIN, hash_fd
from c10.store.layout import (
    CONTROL_DIR,
    CONTROL_FILES,
    ENGINE_NAME,
    ENGINES_DIR,
    is_control,
    split_tagged,
)
from c10.trust.files import CONTROL_MAX, OPEN_FLAGS, REBUILD, open_failure, read_regular
from c10.trust.manifest import is_safe_path, path_problem

HASH_THREADS = min(2, os.cpu_count() or 1)
_CHUNK = 256  # files per worker task: amortizes executor overhead, keeps failures local
# Every control path is one of these or starts with one (a cheap pre-filter for is_control).
_MAYBE_CONTROL = tuple(CONTROL_FILES) + (CONTROL_DIR + "/",)


@dataclass
class Tree:
    """One no-follow walk of the cache: regular files, symlinks and special files by relpath."""

    files: set[str] = field(default_factory=set)
    symlinks: list[str] = field(default_factory=list)
    specials: list[str] = field(default_factory=list)


def _walk(root: Path) -> Tree:
    """Iterative os.scandir walk that never follows a symlink (d_type: no stat per entry).

    Control files are kept out of `files`, so `files - listed` is exactly the extra files.
    """
    tree, stack = Tree(), [("", str(root))]
    while stack:
        prefix, directory = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except OSError as exc:
            raise open_failure(prefix.rstrip("/") or ".", exc) from None
        _classify(tree, stack, prefix, entries)
    return tree


def _classify(tree: Tree, stack: list, prefix: str, entries: list[os.DirEntry]) -> None:
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


def check_files(root: Path, files: list[dict]) -> tuple[int, Tree]:
    """Step 5: every path is checked before any file is opened; then two threads open, stat
    and hash in path-ordered chunks while this thread walks the tree for step 6 (the walk
    overlaps the hashing). The first failure in path order is raised."""
    for entry in files:
        rel = entry["path"]
        if not is_safe_path(rel) or (rel.startswith(_MAYBE_CONTROL) and is_control(rel)):
            raise VerifyError("bad-path", f"Manifest lists unsafe path {rel!r} "
                              f"({path_problem(rel) or 'control file'}); the Manifest is "
                              f"refused: {REBUILD}", str(rel))
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
        fd = os.open(base + rel, OPEN_FLAGS)
    except OSError as exc:
        raise open_failure(rel, exc) from None
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
        raise open_failure(rel, exc) from None
    finally:
        os.close(fd)
    if digest != entry["blake3"]:
        raise VerifyError("hash-mismatch", f"{rel}: blake3 differs from the Manifest (corrupted "
                          f"or replaced); {REBUILD}", rel)
    return size


def _check_stat(rel: str, st: os.stat_result, size: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise VerifyError("special-file", f"{rel} is not a regular file: {REBUILD}", rel)
    if st.st_nlink != 1:
        raise VerifyError("hardlink", f"{rel} has {st.st_nlink} hard links; a file shared with "
                          f"another place can change behind the Manifest: copy the cache "
                          f"without hard links (`cp -r`, not `cp -al`)", rel)
    if st.st_size != size:
        raise VerifyError("size-mismatch", f"{rel} is {st.st_size} bytes, the Manifest says "
                          f"{size} (truncated or extended); {REBUILD}", rel)


def check_coverage(root: Path, tree: Tree, listed: set[str]) -> int:
    """Exactly the listed files plus control files plus pending files; no symlink or special file
    anywhere. Returns the number of pending files."""
    if tree.symlinks:
        rel = sorted(tree.symlinks)[0]
        raise VerifyError("symlink", f"{rel} is a symlink; caches hold no symlinks (not even to "
                          f"directories): remove it (`rm {rel}`) or {REBUILD}", rel)
    if tree.specials:
        rel = sorted(tree.specials)[0]
        raise VerifyError("special-file", f"{rel} is a FIFO, device or socket; remove it "
                          f"(`rm {rel}`)", rel)
    unlisted = sorted(tree.files - listed)
    extra = [rel for rel in unlisted if not is_pending(root, rel)]
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise VerifyError("extra-file", f"{extra[0]}{more} not listed in the Manifest; remove "
                          f"(`rm {extra[0]}`), or {REBUILD}", extra[0])
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
        data = json.loads(read_regular(path, CONTROL_MAX) or b"")
        material_key = key_digest(data["material"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    ok = data.get("key") == key == material_key
    return data if ok else None


def _regular_file_hash(path: Path) -> str | None:
    """blake3 of a regular, singly linked file, opened without following symlinks; None
    otherwise."""
    try:
        fd = os.open(path, OPEN_FLAGS)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        return hash_fd(fd, st.st_size) if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 else None
    except OSError:
        return None
    finally:
        os.close(fd)

