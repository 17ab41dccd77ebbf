"""The listed files' bytes checked (size, mode, blake3): in processes where the host has cores."""
from __future__ import annotations

import multiprocessing
import os
import stat
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import blake3

from c10.errors import VerifyError
from c10.store.digest import MMAP_MIN, hash_fd
from c10.store.layout import CONTROL_DIR, CONTROL_FILES, is_control
from c10.trust.files import OPEN_FLAGS, REBUILD, open_failure
from c10.trust.manifest import is_safe_path, path_problem

# blake3's binding holds the GIL while it hashes a small input, so threads hash one file at a
# time (and two of them contend for the GIL: slower than one); processes hash in parallel.
PROCESSES = min(4, os.cpu_count() or 1)
PROCESS_MIN_FILES = 4096  # below this, starting processes costs more than it saves
_CHUNK = 256  # files per task: amortizes the executor's overhead, keeps failures local
GROUND_BAD_BITS = stat.S_ISUID | stat.S_ISGID
AIRBORNE_BAD_BITS = GROUND_BAD_BITS | stat.S_IWGRP | stat.S_IWOTH
PACK = "write the flight image with `c10 pack CACHE OUT` (not a copy of the cache directory)"
# Every control path is one of these or starts with one (a cheap pre-filter for is_control).
_MAYBE_CONTROL = tuple(CONTROL_FILES) + (CONTROL_DIR + "/",)
# What a forked hashing process reads: set before the fork, so nothing is pickled but ranges.
_JOB: tuple[str, list[dict], int] | None = None


def check_contents(root: Path, files: list[dict], bad_bits: int,
                   meanwhile: Callable[[], object]) -> tuple[int, object]:
    """(total bytes, meanwhile()): every listed file opened, stat'ed and hashed in path-ordered
    chunks by worker processes (or one thread), while this thread runs `meanwhile` (the walk of
    the tree). The first failure in path order is raised."""
    global _JOB
    base = str(root) + os.sep
    ranges = [(i, min(i + _CHUNK, len(files))) for i in range(0, len(files), _CHUNK)]
    # fork only a process with no other thread: a forked thread's locks would stay held
    forkable = PROCESSES > 1 and len(files) >= PROCESS_MIN_FILES and threading.active_count() == 1
    _JOB = (base, files, bad_bits)
    try:
        if forkable:
            context = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(PROCESSES, mp_context=context) as pool:
                pending = pool.map(_hash_range, ranges)
                side = meanwhile()
                results = list(pending)
        else:
            with ThreadPoolExecutor(1) as pool:
                pending = pool.map(_hash_range, ranges)
                side = meanwhile()
                results = list(pending)
    finally:
        _JOB = None
    for failure, _ in results:
        if failure is not None:
            raise failure
    return sum(size for _, size in results), side


def _hash_range(bounds: tuple[int, int]) -> tuple[VerifyError | None, int]:
    """One chunk, in a worker: its first failure is returned, not raised."""
    base, files, bad_bits = _JOB
    total = 0
    for entry in files[bounds[0]:bounds[1]]:
        try:
            total += _check_content(base, entry, bad_bits)
        except VerifyError as err:
            return err, total
    return None, total


def check_paths(files: list[dict]) -> None:
    """Every listed path is relative, normalized and not a control file: checked before any file is
    opened (bad-path)."""
    for entry in files:
        rel = entry["path"]
        if not is_safe_path(rel) or (rel.startswith(_MAYBE_CONTROL) and is_control(rel)):
            raise VerifyError("bad-path", f"Manifest lists unsafe path {rel!r} "
                              f"({path_problem(rel) or 'control file'}); the Manifest is "
                              f"refused: {REBUILD}", str(rel))



def _check_content(base: str, entry: dict, bad_bits: int) -> int:
    """The hot loop (100k files): one open, one fstat, one read, one hash per file."""
    rel, size = entry["path"], entry["size"]
    try:
        fd = os.open(base + rel, OPEN_FLAGS)
    except OSError as exc:
        raise open_failure(rel, exc) from None
    try:
        st = os.fstat(fd)  # of the very file we hash: a swap after the walk cannot slip past
        if (st.st_nlink != 1 or st.st_size != size or not stat.S_ISREG(st.st_mode)
                or st.st_mode & bad_bits):
            check_stat(rel, st, size, bad_bits)
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



def check_stat(rel: str, st: os.stat_result, size: int, bad_bits: int = GROUND_BAD_BITS) -> None:
    """The reason a listed file's fstat is refused (special-file, hardlink, size-mismatch,
    bad-mode), if any."""
    if not stat.S_ISREG(st.st_mode):
        raise VerifyError("special-file", f"{rel} is not a regular file: {REBUILD}", rel)
    if st.st_nlink != 1:
        raise VerifyError("hardlink", f"{rel} has {st.st_nlink} hard links; a file shared with "
                          f"another place can change behind the Manifest: copy the cache "
                          f"without hard links (`cp -r`, not `cp -al`)", rel)
    if st.st_size != size:
        raise VerifyError("size-mismatch", f"{rel} is {st.st_size} bytes, the Manifest says "
                          f"{size} (truncated or extended); {REBUILD}", rel)
    if st.st_mode & bad_bits:
        raise bad_mode(rel, st.st_mode, bad_bits)



def bad_mode(rel: str, mode: int, bad_bits: int) -> VerifyError:
    what = "setuid or setgid" if mode & GROUND_BAD_BITS else "writable by group or others"
    fix = (PACK if bad_bits == AIRBORNE_BAD_BITS
           else f"clear the bits (`chmod ug-s {rel}`) or {REBUILD}")
    return VerifyError("bad-mode", f"{rel} has mode {stat.filemode(mode)}: {what}; no file of a "
                       f"cache is, and an image's files are 0644 and its directories 0755: "
                       f"{fix}", rel)
