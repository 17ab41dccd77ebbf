"""The one atomic-write helper: all or nothing, durable, and a failed write is one clean
StorageError."""
from __future__ import annotations

import errno
import os

import pytest

from c10.errors import C10Error, StorageError
from c10.store import atomic


def _fail_on(monkeypatch, name: str, err: int = errno.EIO) -> list:
    """os.<name> raises OSError(err) every time; returns the list of calls seen."""
    calls = []

    def failing(*args, **kwargs):
        calls.append(args)
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, name, failing)
    return calls


def test_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "f.bin"
    atomic.write_bytes(target, b"one")
    atomic.write_bytes(target, b"two" * 100_000, mode=0o600)
    assert target.read_bytes() == b"two" * 100_000
    assert target.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]


def test_short_writes_are_completed(tmp_path, monkeypatch):
    real = os.write
    # the kernel may do this
    monkeypatch.setattr(os, "write", lambda fd, data: real(fd, bytes(data[:7])))
    atomic.write_bytes(tmp_path / "f", b"0123456789" * 10)
    assert (tmp_path / "f").read_bytes() == b"0123456789" * 10


@pytest.mark.parametrize("name, err, hint", [
    ("write", errno.ENOSPC, "the disk is full: free space"),
    ("fsync", errno.EIO, "I/O error"),
    ("replace", errno.EROFS, "read-only"),
])
def test_a_failed_write_keeps_the_old_file_and_says_what_to_do(tmp_path, monkeypatch, name, err,
                                                               hint):
    target = tmp_path / "shard.npy"
    target.write_bytes(b"previous")
    calls = _fail_on(monkeypatch, name, err)
    with pytest.raises(StorageError) as info:
        atomic.write_bytes(target, b"new bytes")
    monkeypatch.undo()
    exc = info.value
    assert isinstance(exc, C10Error) and isinstance(exc, OSError) and exc.errno == err
    assert (str(exc).startswith(f"{target}: cannot write it ({os.strerror(err)}); ")
            and hint in str(exc))
    assert "doit build_cache" in str(exc)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["shard.npy"]  # the temp file is gone
    assert len(calls) == 1  # never retried (a second fsync could "succeed" over lost pages)


def test_a_failed_directory_fsync_after_the_rename_is_still_an_error(tmp_path, monkeypatch):
    real, seen = os.fsync, []

    def second_fails(fd):
        seen.append(fd)
        if len(seen) == 2:  # 1: the file, 2: its directory
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd)

    monkeypatch.setattr(os, "fsync", second_fails)
    with pytest.raises(StorageError, match="I/O error"):
        atomic.write_bytes(tmp_path / "f", b"x")
    assert len(seen) == 2


def test_atomic_path_for_writers_that_take_a_name(tmp_path):
    target = tmp_path / "engine.onnx"
    with atomic.atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and atomic.is_temp_name(tmp.name)
        tmp.write_bytes(b"engine")
        assert not target.exists()
    assert target.read_bytes() == b"engine"
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("the compiler failed")
    assert (target.read_bytes() == b"engine"
            and [p.name for p in tmp_path.iterdir()] == ["engine.onnx"])


def test_every_writer_goes_through_the_helper():
    """No module of c10/ or rules/ opens a file for writing or saves by name except atomic.py."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    pattern = re.compile(r"open\([^)]*['\"][wax]b?\+?['\"]"
                         r"|\.write_(bytes|text)\(|np\.save[z]?\((?!\s*buf)"
                         r"|write_index\(|\.save\(\s*(str\(|path|out)|os\.O_WRONLY|os\.O_CREAT|shutil\.copy")
    # signing: the key, created exclusively (never replaced)
    # keys: a key is created exclusively (never replaced); pack: files created exclusively in
    # a private directory that appears whole, by one rename, once every file is fsynced
    allowed = {"c10/store/atomic.py", "c10/trust/keys.py", "c10/tools/pack.py"}
    offenders = []
    for path in sorted([*root.glob("c10/**/*.py"), *root.glob("rules/*.py")]):
        rel = path.relative_to(root).as_posix()
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if (pattern.search(code) and rel not in allowed and "atomic." not in code
                    and "devnull" not in code):
                offenders.append(f"{rel}:{n}: {line.strip()}")
    assert offenders == []


def test_a_failed_batch_sync_is_a_storage_error(tmp_path, monkeypatch):
    """syncfs reports a writeback error (EIO) of what was written unsynced: a StorageError
    naming the directory and saying what to check."""
    import ctypes

    def eio(fd):
        ctypes.set_errno(errno.EIO)
        return -1

    monkeypatch.setattr(atomic, "_syncfs", eio)
    with pytest.raises(StorageError, match="I/O error") as info:
        atomic.sync_filesystem(tmp_path)
    assert str(tmp_path) in str(info.value) and "dmesg" in info.value.fix


def test_the_batch_sync_reaches_the_kernel(tmp_path, monkeypatch):
    calls = []
    real = atomic._syncfs
    monkeypatch.setattr(atomic, "_syncfs", lambda fd: calls.append(fd) or real(fd))
    atomic.replace_unsynced(tmp_path / "shard.npy", b"rows")
    atomic.sync_filesystem(tmp_path)
    assert len(calls) == 1 and (tmp_path / "shard.npy").read_bytes() == b"rows"
