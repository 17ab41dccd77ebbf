"""Stale derived files (engines of other keys, leftovers), listed, removed only on request."""
from __future__ import annotations

from pathlib import Path

from c10.store.atomic import is_temp_name
from c10.store.layout import ENGINE_NAME, ENGINES_DIR
from c10.store.orphans import walk_files


def stale_files(root: Path, declared: set[str]) -> tuple[list[str], list[str]]:
    """(stale, unknown): derived files c10 recognises but no task declares, and files it does not
    recognise."""
    stale, unknown = [], []
    if not (root / ENGINES_DIR).is_dir():
        return stale, unknown
    for rel in walk_files(root / ENGINES_DIR):
        full = f"{ENGINES_DIR}/{rel}"
        if full in declared:
            continue
        name = Path(rel).name
        ours = "/" not in rel and (ENGINE_NAME.match(name) or is_temp_name(name))
        (stale if ours and not (root / full).is_symlink() else unknown).append(full)
    return sorted(stale), sorted(unknown)


def remove_files(root: Path, rels: list[str]) -> int:
    """Delete the given cache-relative files; returns bytes freed."""
    freed = 0
    for rel in rels:
        path = root / rel
        freed += path.stat().st_size
        path.unlink()
    return freed
