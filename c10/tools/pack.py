"""`c10 pack CACHE OUT`: the flight image, exactly the signed files, there whole or not at all."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import stat
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

import blake3

from c10.errors import C10Error, VerifyError
from c10.store.atomic import fsync_dir
from c10.store.digest import hash_threads
from c10.store.layout import ENVELOPE_NAME, MANIFEST_NAME
from c10.trust.files import CONTROL_MAX, OPEN_FLAGS, REBUILD, open_failure, read_regular
from c10.trust.hashing import check_paths, check_stat
from c10.trust.manifest import loads_manifest
from c10.trust.tilelists import expand_files
from c10.trust.tree import listed_dirs
from c10.trust.verify import EXIT_CODES, verify_cache, verify_signed_manifest

# The temporary image beside OUT: `.{OUT name}.c10-pack-partial-XXXXXXXX`. A pack holds flock on
# it while it runs; one a killed pack left is unlocked, and the next pack of that OUT removes it.
PARTIAL = ".c10-pack-partial-"
FILE_MODE, DIR_MODE = 0o644, 0o755
COPY_THREADS = 8  # fsync of many small files: the journal commits concurrent ones together
_CHUNK_FILES = 64
_READ = 8 << 20  # bytes per read of a big file: bounded memory whatever its size
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_RENAME_NOREPLACE = 1


class PackError(C10Error):
    """`c10 pack` cannot write the image where asked (OUT exists, no such directory, a write
    failed); nothing is left at OUT."""

    exit_code = 2


@dataclass(frozen=True)
class PackResult:
    """A flight image written and verified strictly (airborne tree rules) at `out`."""

    out: Path
    cache_id: str
    version: int
    files: int
    bytes: int
    elapsed: float
    removed: tuple[str, ...] = ()  # temporary dirs of killed packs of the same OUT


def partial_prefix(out: Path) -> str:
    """The name prefix of a pack's temporary directory for OUT (in OUT's parent)."""
    return f".{Path(out).name}{PARTIAL}"


def pack(cache_root: Path, out: Path, *, trusted: dict, now: datetime,
         state_path: Path | None = None, threshold: int = 1,
         progress: Callable[[str], None] | None = None) -> PackResult:
    """Verify the cache's Manifest (signature, payload, freshness against `state_path`, which is
    only read), then write exactly its listed files and the Manifest pair into a temporary
    directory beside `out`, each read once and checked against its size and blake3 while copied,
    fsync everything, verify that directory strictly, and rename it to `out` (never over anything).

    VerifyError (the verify reason of what is wrong in the cache) or PackError; either way nothing
    is at `out` and the temporary directory is gone."""
    start = time.perf_counter()
    root, out = Path(cache_root), Path(os.path.abspath(out))
    _check_target(root, out)
    manifest = verify_signed_manifest(root, trusted=trusted, now=now, state_path=state_path,
                                      threshold=threshold)
    payload, envelope = _read_pair(root, manifest)
    check_paths(manifest["files"])  # the root's, before a tile list is opened
    files = expand_files(root, manifest)
    check_paths(files)
    with _parent_locked(out.parent):
        removed = _remove_leftovers(out)
        tmp, lock = _make_partial(out)
    try:
        if progress:
            progress(f"{root}: Manifest v{manifest['version']} verified; copying "
                     f"{len(files)} files into {tmp}")
        total = _copy_listed(root, tmp, files)
        _write_new(tmp / MANIFEST_NAME, payload)
        _write_new(tmp / ENVELOPE_NAME, envelope)
        for rel in sorted(listed_dirs(files), reverse=True):
            fsync_dir(tmp / rel)
        fsync_dir(tmp)
        verify_cache(tmp, trusted=trusted, now=now, state_path=None, threshold=threshold,
                     strict=True)
        _rename_noreplace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(lock)
    try:
        fsync_dir(out.parent)
    except OSError as exc:
        raise PackError(f"{out} is written and verified but its directory entry may not be "
                        f"durable ({exc.strerror})", "run sync before moving the medium") from None
    return PackResult(out, manifest["cache_id"], manifest["version"], len(files), total,
                      time.perf_counter() - start, tuple(removed))


def _check_target(root: Path, out: Path) -> None:
    if os.path.lexists(out):
        raise PackError(f"{out} already exists; c10 pack never overwrites or removes it",
                        "choose a new OUT, or move the old image away yourself")
    if not out.parent.is_dir():
        raise PackError(f"{out.parent} (the directory of {out.name}) does not exist",
                        f"create it (`mkdir -p {out.parent}`) or choose another OUT")
    cache, parent = root.resolve(), out.parent.resolve()
    if parent == cache or cache in parent.parents:
        raise PackError(f"{out} is inside the cache {cache}: the cache would then hold files no "
                        "task declares", "write the image outside the cache directory")


def _read_pair(root: Path, manifest: dict) -> tuple[bytes, bytes]:
    """The Manifest pair's bytes as they are now: Manifest.json must still be the Manifest that
    verified (the image's own strict verification checks the envelope over these bytes)."""
    pair = []
    for name in (MANIFEST_NAME, ENVELOPE_NAME):
        try:
            data = read_regular(root / name, CONTROL_MAX)
        except OSError as exc:
            raise open_failure(name, exc) from None
        if data is None:
            raise VerifyError("special-file", f"{name} is not a regular file of sane size; "
                              f"{REBUILD}", name)
        pair.append(data)
    if loads_manifest(pair[0]) != manifest:
        raise VerifyError("envelope-mismatch", f"{MANIFEST_NAME} changed while c10 pack read it "
                          f"(a build running in {root}?); wait for it, then pack again",
                          MANIFEST_NAME)
    return pair[0], pair[1]


@contextlib.contextmanager
def _parent_locked(parent: Path):
    """flock OUT's parent while leftovers are removed and the temporary dir is made and locked:
    two packs beside each other never take the other's directory for a leftover."""
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with contextlib.suppress(OSError):  # a file system without flock: the race is tiny
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _remove_leftovers(out: Path) -> list[str]:
    """Remove the temporary dirs of killed packs of `out` (named by partial_prefix, unlocked)."""
    prefix, removed = partial_prefix(out), []
    with os.scandir(out.parent) as it:
        leftovers = [e for e in it if e.name.startswith(prefix)
                     and e.is_dir(follow_symlinks=False)]
    for entry in leftovers:
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a pack of the same OUT is running: its directory is not a leftover
            os.close(fd)
            continue
        try:
            shutil.rmtree(entry.path)
            removed.append(entry.path)
        except OSError as exc:
            raise PackError(f"cannot remove {entry.path}, the temporary image of a killed c10 "
                            f"pack ({exc.strerror})", f"remove it (`rm -r {entry.path}`)") from None
        finally:
            os.close(fd)
    return removed


def _make_partial(out: Path) -> tuple[Path, int]:
    """The temporary image directory beside `out` (mode 0755), and the fd holding its flock."""
    try:
        tmp = Path(tempfile.mkdtemp(prefix=partial_prefix(out), dir=out.parent))
        os.chmod(tmp, DIR_MODE)
        fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise _write_failure(out.parent, out, exc) from None
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return tmp, fd


def _copy_listed(root: Path, tmp: Path, files: list[dict]) -> int:
    """Make the listed directories (0755), then copy the files in path-ordered chunks on a few
    threads; the first failure in path order is raised and the rest is not started."""
    for rel in sorted(listed_dirs(files)):
        try:
            os.mkdir(tmp / rel, DIR_MODE)
            os.chmod(tmp / rel, DIR_MODE)  # whatever the umask
        except OSError as exc:
            raise _write_failure(tmp / rel, tmp, exc) from None
    src, dst = str(root) + os.sep, str(tmp) + os.sep
    chunks = [files[i:i + _CHUNK_FILES] for i in range(0, len(files), _CHUNK_FILES)]
    with ThreadPoolExecutor(max_workers=COPY_THREADS) as pool:
        futures = [pool.submit(_copy_chunk, src, dst, chunk) for chunk in chunks]
        try:
            return sum(f.result() for f in futures)
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def _copy_chunk(src: str, dst: str, chunk: list[dict]) -> int:
    return sum(_copy_one(src, dst, entry) for entry in chunk)


def _copy_one(src: str, dst: str, entry: dict) -> int:
    """Read a listed file once (no symlink followed, a regular singly linked file of the listed
    size), hashing and writing each chunk; refuse it unless the bytes read are the listed ones.
    The copy is 0644 and fsynced."""
    rel, size = entry["path"], entry["size"]
    try:
        fd = os.open(src + rel, OPEN_FLAGS)
    except OSError as exc:
        raise open_failure(rel, exc) from None
    try:
        st = os.fstat(fd)
        if st.st_nlink != 1 or st.st_size != size or not stat.S_ISREG(st.st_mode):
            check_stat(rel, st, size, 0)  # (the copy's mode is 0644 whatever the source's)
        digest = _copy_fd(fd, rel, size, dst + rel)
    finally:
        os.close(fd)
    if digest != entry["blake3"]:
        raise VerifyError("hash-mismatch", f"{rel}: blake3 differs from the Manifest (corrupted "
                          f"or replaced); nothing was packed: {REBUILD}", rel)
    return size


def _copy_fd(fd: int, rel: str, size: int, target: str) -> str:
    """Copy `size` bytes from `fd` to a new file `target`: the blake3 of what was read."""
    hasher = blake3.blake3(max_threads=hash_threads(size))
    try:
        out = os.open(target, _WRITE_FLAGS, FILE_MODE)
    except OSError as exc:
        raise _write_failure(Path(target), Path(target).parent, exc) from None
    try:
        os.fchmod(out, FILE_MODE)  # whatever the umask
        done = 0
        while True:
            try:
                data = os.read(fd, min(_READ, size - done + 1))  # +1: a file that grew is seen
            except OSError as exc:
                raise open_failure(rel, exc) from None
            if not data:
                break
            done += len(data)
            if done > size:
                break
            hasher.update(data)
            _write_all(out, data)
        if done != size:
            raise VerifyError("size-mismatch", f"{rel} changed size while it was copied (the "
                              f"Manifest says {size} bytes); nothing was packed: {REBUILD}", rel)
        os.fsync(out)
    except OSError as exc:
        raise _write_failure(Path(target), Path(target).parent, exc) from None
    finally:
        os.close(out)
    return hasher.hexdigest()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _write_new(target: Path, data: bytes) -> None:
    """One of the Manifest pair, as read from the cache, 0644, fsynced."""
    try:
        fd = os.open(target, _WRITE_FLAGS, FILE_MODE)
        try:
            os.fchmod(fd, FILE_MODE)
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise _write_failure(target, target.parent, exc) from None


def _write_failure(target: Path, where: Path, exc: OSError) -> PackError:
    hint = {errno.ENOSPC: "free space on that disk", errno.EDQUOT: "free space on that disk",
            errno.EROFS: "remount it read-write", errno.EACCES: "fix the permissions there",
            errno.EPERM: "fix the permissions there"}.get(exc.errno, "check the disk")
    return PackError(f"{target}: cannot write it ({exc.strerror or exc}); nothing was left at the "
                     f"image's place", f"{hint}, then run c10 pack again")


def _rename_noreplace(tmp: Path, out: Path) -> None:
    """Rename the finished image to `out`, refusing (never replacing) anything there: renameat2
    with RENAME_NOREPLACE, else a check right before rename (which would replace an empty dir)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        at_fdcwd = -100
        if renameat2(at_fdcwd, os.fsencode(tmp), at_fdcwd, os.fsencode(out),
                     _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise PackError(f"{out} appeared while c10 pack ran; it was left as it is",
                            "choose a new OUT, or move that one away yourself")
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise _write_failure(out, out.parent, OSError(err, os.strerror(err)))
    if os.path.lexists(out):
        raise PackError(f"{out} appeared while c10 pack ran; it was left as it is",
                        "choose a new OUT, or move that one away yourself")
    try:
        os.rename(tmp, out)
    except OSError as exc:
        raise _write_failure(out, out.parent, exc) from None


def exit_code(err: VerifyError) -> int:
    """The exit code of a refused cache: verify's for the same reason."""
    return EXIT_CODES.get(err.reason, 1)
