"""The one atomic-write helper: temp file beside the target, fsync, os.replace, fsync the directory."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


def fsync_dir(directory: Path) -> None:
    """Make a rename inside `directory` durable (an fsync error is fatal, never retried)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temp path beside `target`; on success fsync it and rename it over `target`.

    For writers that only take a file name (faiss.write_index, onnxruntime, OpenVINO).
    On any error the temp file is removed and `target` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, mode)
        fd = os.open(tmp_path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise
    fsync_dir(target.parent)


def write_bytes(target: str | os.PathLike, data: bytes, mode: int = 0o644) -> None:
    """Atomically replace `target` with `data`."""
    with atomic_path(target, mode) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


def write_text(target: str | os.PathLike, text: str, mode: int = 0o644) -> None:
    """Atomically replace `target` with UTF-8 `text`."""
    write_bytes(target, text.encode("utf-8"), mode)


def is_temp_name(name: str) -> bool:
    """True for a leftover temp file of `atomic_path` (a killed writer leaves these)."""
    return name.startswith(".") and name.endswith(".tmp")
