"""The coverage gate: every file under the cache is declared by the graph or is a control file."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

from c10.atomic import is_temp_name
from c10.paths import CONTROL_DIR, CONTROL_FILES, STAGING_DIR, is_control

# Wholly owned by the graph: an undeclared file here is a dead output and is removed by the build.
OWNED_DIRS = ("shards", "index")
# Derived dirs where a killed writer may have left an atomic-write temp file.
DERIVED_DIRS = ("engines", "shards", "index")


def walk_files(root: Path, skip: Iterable[str] = ()) -> Iterator[str]:
    """Every non-directory entry under root as a relative posix path, never following symlinks;
    top-level directories named in `skip` are not entered."""
    stack, skip = [""], frozenset(skip)
    while stack:
        rel_dir = stack.pop()
        with os.scandir(root / rel_dir if rel_dir else root) as it:
            for entry in it:
                rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                if entry.is_dir(follow_symlinks=False):
                    if not is_control(rel + "/") and rel not in skip:
                        stack.append(rel)
                else:
                    yield rel


def find_orphans(root: Path, declared: set[str], scanned: str | None = None,
                 scanned_orphans: Iterable[str] = ()) -> list[str]:
    """Files that are neither declared nor control files, sorted. The top-level dir `scanned` is
    not walked again: the caller already listed every file in it, and its orphans are `scanned_orphans`."""
    walked = walk_files(root, (scanned,) if scanned else ())
    return sorted([rel for rel in walked if rel not in declared and not is_control(rel)] + list(scanned_orphans))


def dead_files(root: Path, keep: set[str], also_keep: Callable[[], set[str]] = set) -> list[str]:
    """Files in graph-owned dirs outside `keep` and `also_keep()` (asked only if needed: it may
    parse the Manifest), and writers' temp files in derived dirs; never a symlink."""
    candidates = []
    for top in DERIVED_DIRS:
        if (root / top).is_dir():
            for rel in walk_files(root / top):
                full = f"{top}/{rel}"
                if is_temp_name(Path(rel).name) or (top in OWNED_DIRS and full not in keep):
                    candidates.append(full)
    kept = also_keep() if any(not is_temp_name(Path(c).name) for c in candidates) else set()
    return [rel for rel in candidates if rel not in kept and not (root / rel).is_symlink()]


def remove_dead(root: Path, keep: set[str], also_keep: Callable[[], set[str]] = set) -> list[str]:
    """Delete what dead_files lists, and killed writers' temp files of control files."""
    removed = dead_files(root, keep, also_keep)
    for rel in removed:
        (root / rel).unlink()
    for top in DERIVED_DIRS:
        if removed and (root / top).is_dir():
            _prune_empty_dirs(root / top)
    return removed + _remove_dead_temps(root)


def _remove_dead_temps(root: Path) -> list[str]:
    """Temp files of killed writers: of root control files, in .c10/, and everything staged in
    .c10/tmp/ (under the build lock, once every writer of this build has finished)."""
    ours = tuple(f".{name}." for name in CONTROL_FILES)
    removed = []
    for top in ("", CONTROL_DIR):
        with contextlib.suppress(FileNotFoundError), os.scandir(root / top) as it:
            for entry in list(it):
                if is_temp_name(entry.name) and entry.is_file(follow_symlinks=False) \
                        and (top or entry.name.startswith(ours)):
                    os.unlink(entry.path)
                    removed.append(f"{top}/{entry.name}" if top else entry.name)
    if (root / STAGING_DIR).is_dir():
        staged = list(walk_files(root / STAGING_DIR))
        for rel in staged:
            os.unlink(root / STAGING_DIR / rel)
        _prune_empty_dirs(root / STAGING_DIR)
        removed += [f"{STAGING_DIR}/{rel}" for rel in staged]
    return removed


def _prune_empty_dirs(top: Path) -> None:
    for dirpath, _, _ in os.walk(top, topdown=False):
        if dirpath != str(top):
            with contextlib.suppress(OSError):  # not empty: keep it
                os.rmdir(dirpath)
