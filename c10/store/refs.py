"""Content-named shard and index files, and the refs that name the build's current ones."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import blake3

from c10.store import atomic
from c10.store.digest import blake3_file
from c10.store.layout import (
    MANIFEST_NAME,
    REFS_DIR,
    STAGING_DIR,
    ref_relpath,
    split_tagged,
    tagged_relpath,
)
from c10.store.tiles import racy


def write_artifact(root: Path, logical: str, data: bytes) -> dict:
    """Write `data` under its content name beside `logical`; its Manifest-style entry.

    A new name never replaces a file the committed Manifest lists (same bytes, same name). No
    fsync: the commit makes the build's writes durable at once (atomic.sync_filesystem) before
    it signs; a file a power cut lost before then no longer has the hash its ref records and is
    rebuilt."""
    digest = blake3.blake3(data).hexdigest()
    rel = tagged_relpath(logical, digest)
    if not _holds(Path(root) / rel, len(data), digest):  # an unchanged id map, a reverted tile
        atomic.replace_unsynced(Path(root) / rel, data, staging=Path(root) / STAGING_DIR)
    return {"path": rel, "size": len(data), "blake3": digest}


def _holds(path: Path, size: int, digest: str) -> bool:
    """A regular file with exactly these bytes is already there (hashing is cheaper than a
    write)."""
    try:
        st = os.lstat(path)
        return stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_size == size \
            and blake3_file(path) == digest
    except OSError:
        return False


def publish(root: Path, logical: str, data: bytes) -> dict:
    """Write `data` under its content name, then point the ref of `logical` at it: its entry."""
    entry = write_artifact(root, logical, data)
    write_ref(root, logical, entry)
    return entry


def write_ref(root: Path, logical: str, entry: dict) -> None:
    """Point `logical` at its new file: the step that makes it the build's current one. No fsync
    (two per ref, the most of a small shard task's cost): a ref is only trusted where it equals
    the entry doit saved and names a file of those bytes, so one a power cut lost is rebuilt."""
    atomic.replace_unsynced(Path(root) / ref_relpath(logical),
                            json.dumps(entry, sort_keys=True).encode(),
                            staging=Path(root) / STAGING_DIR)


# ref path -> (its stat key, its entry): a build reads every ref several times (task checks, the
# index, coverage, the Manifest); c10 replaces a ref by a rename, which changes the key, and an
# edit in place changes its mtime and ctime unless within the clock tick of the last change (racy).
_READ: dict[str, tuple[tuple, dict | None]] = {}


def read_ref(root: Path, logical: str) -> dict | None:
    """The entry a ref names, or None if it is missing or not one of ours."""
    path = os.path.join(root, ref_relpath(logical))
    try:  # os-level: every no-op build reads every ref (refs_current)
        st = os.stat(path)
        key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_dev)
        hit = _READ.get(path)
        if hit is None or hit[0] != key:
            with open(path, "rb") as f:
                hit = (key, _parse_ref(f.read(), logical))
            if not racy(st):  # else an edit in the same clock tick would keep this key
                _READ[path] = hit
    except OSError:
        return None
    return dict(hit[1]) if hit[1] is not None else None


def _parse_ref(data: bytes, logical: str) -> dict | None:
    try:
        entry = json.loads(data)
    except ValueError:
        return None
    split = split_tagged(str(entry.get("path"))) if isinstance(entry, dict) else None
    return entry if split and split[0] == logical else None


def remove_stale_refs(root: Path, logicals: set[str]) -> list[str]:
    """Delete refs of artifacts the graph no longer has (a block whose tiles all went); their
    files stay until the next commit removes them (the last Manifest may list them)."""
    top, removed = Path(root) / REFS_DIR, []
    for dirpath, _, names in os.walk(top):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), top).replace(os.sep, "/")
            if name.endswith(".json") and rel.removesuffix(".json") not in logicals:
                os.unlink(os.path.join(dirpath, name))
                removed.append(f"{REFS_DIR}/{rel}")
    return removed


def current_entry(root: Path, logical: str) -> dict:
    """The build's current entry for `logical`, or IndexBuildError saying what to run."""
    from c10.errors import IndexBuildError

    entry = read_ref(root, logical)
    if entry is None:
        raise IndexBuildError(f"{root}: the build has no {logical} (its ref {ref_relpath(logical)} "
                              "is missing or damaged)")
    return entry


def current_path(root: Path, logical: str) -> Path | None:
    """The ref's file for `logical`, or None."""
    entry = read_ref(root, logical)
    return Path(root) / entry["path"] if entry else None




def committed_files(root: Path) -> dict[str, str]:
    """Content-named path -> logical path of every shard and index file Manifest.json lists.

    Unverified: used only to keep those files alive and to locate them, never to trust them."""
    return _read_committed(Path(root) / MANIFEST_NAME)


def _read_committed(path: Path) -> dict[str, str]:
    try:
        files = json.loads(path.read_bytes())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    out = {}
    for entry in files if isinstance(files, list) else ():
        split = split_tagged(str(entry.get("path"))) if isinstance(entry, dict) else None
        if split:
            out[entry["path"]] = split[0]
    return out
