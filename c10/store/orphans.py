"""Orphans and dead files: what the coverage gate removes and what it refuses."""
from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from c10.store.atomic import is_temp_name
from c10.store.layout import (
    CONTROL_DIR,
    CONTROL_FILES,
    DERIVED_DIRS,
    OWNED_DIRS,
    STAGING_DIR,
    is_control,
)


@dataclass(frozen=True)
class Verdict:
    """What the coverage gate decides: files it removes, and undeclared files that fail the
    build."""

    dead: list[str]
    orphans: list[str]


def verdict(root: Path, declared: set[str], live: set[str], committed: Callable[[], set[str]],
            scanned: str | None = None, scanned_orphans: Iterable[str] = ()) -> Verdict:
    """The gate's verdict, written nothing: dead graph-owned files (outside `live` and the committed
    Manifest's files) and orphans (neither declared, live, committed, dead nor control)."""
    dead = dead_files(root, live, committed)
    gone = set(dead)
    orphans = [rel for rel in find_orphans(root, declared | live, scanned,
                                           scanned_orphans) if rel not in gone]
    if orphans:
        kept = committed()
        orphans = [rel for rel in orphans if rel not in kept]
    return Verdict(dead, orphans)


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
    not walked again: the caller already listed every file in it, and its orphans are
    `scanned_orphans`."""
    walked = walk_files(root, (scanned,) if scanned else ())
    found = [rel for rel in walked if rel not in declared and not is_control(rel)]
    return sorted(found + list(scanned_orphans))


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


UNLINK_BATCH, UNLINK_THREADS = 64, 8


def remove_dead(root: Path, dead: list[str]) -> list[str]:
    """Delete `dead` (from dead_files or a verdict), and killed writers' temp files of control
    files."""
    removed = list(dead)
    if len(removed) < UNLINK_BATCH:
        for rel in removed:
            os.unlink(root / rel)
    else:  # the kernel runs unlinks side by side; one by one, each waits on the journal
        with ThreadPoolExecutor(UNLINK_THREADS) as pool:
            list(pool.map(os.unlink, [root / rel for rel in removed]))
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
