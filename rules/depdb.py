"""doit's dependency DB (.c10/doit.sqlite): a corrupt one is moved aside with a warning."""
from __future__ import annotations

import os
import sqlite3
import sys
import time
from pathlib import Path

# sqlite's own side files: a hot journal left beside a replaced DB would be replayed into it.
SIDE_SUFFIXES = ("-journal", "-wal", "-shm")
# Only these mean "the bytes are bad"; busy/locked/readonly mean another process is at work.
CORRUPT_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})


def recover(path: str | os.PathLike) -> Path | None:
    """Move a corrupt DB (and its side files) aside so doit starts from an empty one; the new name
    or None.

    doit commits its sqlite DB once at the end of a run, in one transaction, so a kill loses
    that run's records and nothing else. Bytes sqlite cannot read (a disk fault, a copy
    cut short) make doit stop with DatabaseException instead: an empty DB only makes the
    next build re-decide every task by content hash (engines and descriptors are reused).
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return None
    except OSError:
        return None
    problem = _problem(path)
    if problem is None:
        return None
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    for suffix in SIDE_SUFFIXES:
        if Path(f"{path}{suffix}").exists():
            os.replace(f"{path}{suffix}", f"{aside}{suffix}")
    os.replace(path, aside)
    print(f"warning: {path} is corrupt ({problem}); moved it to {aside.name} and starting from an "
          "empty one: this build re-runs every task once, reusing the engines and descriptors on "
          "disk",
          file=sys.stderr)
    return aside


def _problem(path: Path) -> str | None:
    """Why sqlite cannot read `path`, or None when it can (or cannot tell: another process holds
    it)."""
    try:
        conn = sqlite3.connect(path, timeout=2.0)  # read-write: sqlite rolls back a hot journal
        try:
            rows = conn.execute("PRAGMA quick_check").fetchall()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        return str(exc) if getattr(exc, "sqlite_errorcode", None) in CORRUPT_CODES else None
    if rows != [("ok",)]:
        return "; ".join(str(r[0]) for r in rows[:3])
    return None
