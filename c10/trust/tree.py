"""The cache tree as the verifier sees it: one no-follow walk, the listed files hashed."""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from c10.canonical import digest as key_digest
from c10.errors import VerifyError
from c10.store.digest import hash_fd
from c10.store.layout import (
    CONTROL_DIR,
    CONTROL_FILES,
    ENGINE_NAME,
    ENGINES_DIR,
    ENVELOPE_NAME,
    MANIFEST_NAME,
    TAGGED_DIRS,
    is_control_dir_dir,
    is_control_dir_file,
    split_tagged,
)
from c10.trust.files import OPEN_FLAGS, REBUILD, open_failure
from c10.trust.hashing import (
    AIRBORNE_BAD_BITS,
    GROUND_BAD_BITS,
    PACK,
    bad_mode,
    check_contents,
    check_paths,
)
from c10.trust.strictjson import StrictJSONError, strict_loads

# No file of a cache is setuid or setgid; an image's are not writable by group or others either
# (a writable file or directory could change after the check, behind the Manifest).

# Pending files of a stopped build, bounded before a byte is hashed.
PENDING_FORMATS = (".npy", ".faiss", ".json")  # what shards/, index/ and tilelists/ hold
PENDING_GROWTH, PENDING_SLACK = 4, 1 << 20  # at most 4x the listed file of the logical + 1 MiB
SIDECAR_MAX = 1 << 20  # an engine sidecar is about 1 KB
SIDECAR_DEPTH = 16
_NPY_HEAD = 16 << 10  # numpy refuses headers above 10000 bytes


@dataclass
class Tree:
    """One no-follow walk of the cache: regular files, symlinks and special files by relpath, and
    what the walk refused by name or mode without opening it."""

    files: set[str] = field(default_factory=set)
    symlinks: list[str] = field(default_factory=list)
    specials: list[str] = field(default_factory=list)
    extras: list[str] = field(default_factory=list)  # refused by name: never opened nor hashed
    modes: list[tuple[str, int]] = field(default_factory=list)  # (relpath, st_mode) refused
    # ground: unlisted tiles outside the signed area, accepted by name, never opened (CP-TC-3)
    out_of_scope: list[str] = field(default_factory=list)


def _walk(root: Path, image_dirs: set[str] | None) -> Tree:
    """Iterative os.scandir walk that never follows a symlink (d_type: no stat per file).

    Ground (image_dirs None): control files are kept out of `files`, and .c10/ is walked against
    its allowlist, so `files - listed` is exactly the extra and pending files. Airborne: only the
    Manifest pair is kept out, and a directory holding no listed file is not entered (an extra)."""
    tree, stack = Tree(), [("", str(root))]
    if image_dirs is not None:
        _check_mode(tree, ".", os.stat(root).st_mode, AIRBORNE_BAD_BITS)
    while stack:
        prefix, directory = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except OSError as exc:
            raise open_failure(prefix.rstrip("/") or ".", exc) from None
        if image_dirs is not None:
            _classify_airborne(tree, stack, prefix, entries, image_dirs)
        elif prefix.startswith(CONTROL_DIR + "/"):
            _classify_control_dir(tree, stack, prefix, entries)
        else:
            _classify(tree, stack, prefix, entries)
    return tree


def _classify(tree: Tree, stack: list, prefix: str, entries: list[os.DirEntry]) -> None:
    files = tree.files
    # Control files live only at the top level and in .c10/.
    controls_here = not prefix
    for entry in entries:
        rel = prefix + entry.name
        if entry.is_file(follow_symlinks=False):  # most entries: one d_type test
            if not (controls_here and rel in CONTROL_FILES):
                files.add(rel)
            else:  # a handful of files: one lstat each
                _check_mode(tree, rel, entry.stat(follow_symlinks=False).st_mode,
                            GROUND_BAD_BITS)
        elif entry.is_dir(follow_symlinks=False):
            stack.append((rel + "/", entry.path))
        elif entry.is_symlink():
            tree.symlinks.append(rel)
        else:
            tree.specials.append(rel)


def _classify_control_dir(tree: Tree, stack: list, prefix: str,
                          entries: list[os.DirEntry]) -> None:
    """.c10/ holds only what c10 writes there (c10.store.layout.is_control_dir_file): known names,
    regular files, never setuid; anything else is an extra file, never opened."""
    inner = prefix[len(CONTROL_DIR) + 1:]
    for entry in entries:
        rel, own = prefix + entry.name, inner + entry.name
        if entry.is_file(follow_symlinks=False):
            if is_control_dir_file(own):
                _check_mode(tree, rel, entry.stat(follow_symlinks=False).st_mode,
                            GROUND_BAD_BITS)
            else:
                tree.extras.append(rel)
        elif entry.is_dir(follow_symlinks=False):
            if is_control_dir_dir(own):
                stack.append((rel + "/", entry.path))
            else:
                tree.extras.append(rel)
        elif entry.is_symlink():
            tree.symlinks.append(rel)
        else:
            tree.specials.append(rel)


def _classify_airborne(tree: Tree, stack: list, prefix: str, entries: list[os.DirEntry],
                       image_dirs: set[str]) -> None:
    """A flight image: the listed files, the directories that hold them, the Manifest pair."""
    files = tree.files
    for entry in entries:
        rel = prefix + entry.name
        if entry.is_file(follow_symlinks=False):
            if prefix or rel not in (MANIFEST_NAME, ENVELOPE_NAME):
                files.add(rel)  # the listed ones are checked (mode too) by the hashing threads
            else:
                _check_mode(tree, rel, entry.stat(follow_symlinks=False).st_mode,
                            AIRBORNE_BAD_BITS)
        elif entry.is_dir(follow_symlinks=False):
            if rel in image_dirs:
                _check_mode(tree, rel, entry.stat(follow_symlinks=False).st_mode,
                            AIRBORNE_BAD_BITS)
                stack.append((rel + "/", entry.path))
            else:  # .c10/, an empty directory, a tree of smuggled files: never entered
                tree.extras.append(rel)
        elif entry.is_symlink():
            tree.symlinks.append(rel)
        else:
            tree.specials.append(rel)


def _check_mode(tree: Tree, rel: str, mode: int, bad_bits: int) -> None:
    if mode & bad_bits:
        tree.modes.append((rel, mode))


def listed_dirs(files: list[dict]) -> set[str]:
    """Every directory that holds a listed file, at any depth (tiles, tiles/18, tiles/18/7...)."""
    dirs: set[str] = set()
    for entry in files:
        parent = entry["path"].rpartition("/")[0]
        while parent and parent not in dirs:
            dirs.add(parent)
            parent = parent.rpartition("/")[0]
    return dirs


def check_files(root: Path, files: list[dict], strict: bool = False) -> tuple[int, Tree]:
    """Step 5: every path is checked before any file is opened; then the listed files are opened,
    stat'ed and hashed (c10.trust.hashing) while this thread walks the tree for step 6. The first
    failure in path order is raised.

    strict (airborne): the tree must be a flight image (see _walk), and the listed files must not
    be writable by group or others; on the ground only setuid/setgid is refused."""
    check_paths(files)
    bad_bits = AIRBORNE_BAD_BITS if strict else GROUND_BAD_BITS
    return check_contents(root, files, bad_bits,
                          lambda: _walk(root, listed_dirs(files) if strict else None))


def check_coverage(root: Path, tree: Tree, manifest: dict, strict: bool = False,
                   files: list[dict] | None = None) -> int:
    """Exactly the listed files plus control files plus pending files plus, on the ground, tiles
    outside the signed area (airborne: the listed files and the Manifest pair only); no symlink or
    special file anywhere. Returns the number of pending files (always 0 airborne); the tiles out
    of scope are left in tree.out_of_scope."""
    if tree.symlinks:
        rel = sorted(tree.symlinks)[0]
        raise VerifyError("symlink", f"{rel} is a symlink; caches hold no symlinks (not even to "
                          f"directories): remove it (`rm {rel}`) or {REBUILD}", rel)
    if tree.specials:
        rel = sorted(tree.specials)[0]
        raise VerifyError("special-file", f"{rel} is a FIFO, device or socket; remove it "
                          f"(`rm {rel}`)", rel)
    if tree.modes:
        rel, mode = sorted(tree.modes)[0]
        raise bad_mode(rel, mode, AIRBORNE_BAD_BITS if strict else GROUND_BAD_BITS)
    listed = {f["path"] for f in (manifest["files"] if files is None else files)}
    unlisted = sorted(tree.files - listed)
    if strict:
        _refuse_extra(sorted(tree.extras + unlisted), f"a flight image holds only the files its "
                      f"Manifest lists and the Manifest pair: {PACK}")
        return 0
    _refuse_extra(sorted(tree.extras), f"c10 writes no such file into {CONTROL_DIR}/; remove it "
                  f"(`rm -r {{rel}}`)")
    tree.out_of_scope = out_of_scope_tiles(root, unlisted, manifest)
    unlisted = sorted(set(unlisted) - set(tree.out_of_scope))
    if not unlisted:
        return 0
    accepted, refused = pending_files(root, unlisted, manifest)
    _refuse_extra(refused, f"remove it (`rm {{rel}}`), or {REBUILD}")
    return len(accepted)


def _refuse_extra(extra: list[str], fix: str) -> None:
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise VerifyError("extra-file", f"{extra[0]}{more} not listed in the Manifest; "
                          + fix.replace("{rel}", extra[0]), extra[0])


def out_of_scope_tiles(root: Path, unlisted: list[str], manifest: dict) -> list[str]:
    """The unlisted files that are tiles outside the area the Manifest signs (runtime.area): inputs
    a ground cache holds for another request, which the build never indexes nor signs (CP-TC-3) and
    `c10 pack` never copies. Decided by name as the build's tile scan decides (one file per z/x/y,
    the first name), then one lstat each: a regular, singly linked, not setuid file. Never opened.
    A tile inside the signed area that the Manifest does not list is not one of them."""
    candidates = [rel for rel in unlisted if rel.startswith("tiles/")]
    if not candidates:
        return []
    from c10.store.tiles import Scope, tile_of  # the build's own rule (mercantile): ground only

    try:
        area = manifest["runtime"]["area"]
        bbox = tuple(float(v) for v in area["bbox"] if type(v) in (int, float))
        zooms = [z for z in area["zooms"] if type(z) is int and 0 <= z <= 30]
        scope = Scope(bbox, zooms) if len(bbox) == 4 and zooms else None
    except (KeyError, TypeError, ValueError, OverflowError):  # schema 1 has no runtime spec
        scope = None
    if scope is None:
        return []
    seen, out = set(), []
    for rel in sorted(candidates):
        tile = tile_of(rel)
        if tile is None or tile in scope or tile in seen:
            continue
        seen.add(tile)
        try:
            st = os.lstat(root / rel)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and not st.st_mode & GROUND_BAD_BITS:
            out.append(rel)
    return out


# ---------------------------------------------------------------- pending files of a stopped build

@dataclass
class _Layout:
    """What the Manifest's own layout can produce beside its files: the logical paths of its shard
    and index files (with the size of the listed file) and the models of its engines (with the size
    of their largest listed engine)."""

    logicals: dict[str, int]
    models: dict[str, int]

    @classmethod
    def of(cls, manifest: dict) -> _Layout:
        sizes, logicals = {}, {}
        for f in manifest["files"]:
            rel = f["path"]
            sizes[rel] = f["size"]
            if rel.startswith(tuple(d + "/" for d in TAGGED_DIRS)):
                split = split_tagged(rel)  # (an untagged listing, c10 0.1's, is its own logical)
                logical = split[0] if split else rel
                logicals[logical] = max(logicals.get(logical, 0), f["size"])
        models: dict[str, int] = {}
        for eng in manifest["engines"]:  # each names a listed file (loads_manifest checked)
            path = eng.get("path")
            match = ENGINE_NAME.match(path.removeprefix(ENGINES_DIR + "/")) \
                if isinstance(path, str) and path.startswith(ENGINES_DIR + "/") else None
            for model in {eng.get("model"), match["model"] if match else None} - {None}:
                if isinstance(model, str):
                    models[model] = max(models.get(model, 0), sizes.get(path, 0))
        return cls(logicals, models)


def pending_files(root: Path, unlisted: list[str], manifest: dict) -> tuple[list[str], list[str]]:
    """(accepted, refused): which unlisted files are pending files a build wrote beside the
    committed ones before it was stopped, and which are extra files.

    Only names the Manifest's own layout produces are candidates, decided by name before any file
    is opened: a shard or index file `{stem}.{16 hex}{.npy|.faiss}` of a logical path the Manifest
    lists, one per logical path; an engine sidecar `engines/{model}-{key}.json` (and at most one
    engine of that key) of a model the Manifest has an engine of, one key per model. A candidate is
    then opened without following a symlink, must be a regular, singly linked, not setuid file of
    bounded size, must parse as its format (an .npy header whose shape and dtype give its size, a
    FAISS magic; a sidecar as strict JSON whose key material hashes to its name), and only then is
    hashed: a shard or index file to the tag in its name, an engine to the blake3 its sidecar
    records. Nothing loads a pending file; the next build commits or removes it."""
    layout = _Layout.of(manifest)
    accepted: list[str] = []
    refused: list[str] = []
    by_logical: dict[str, list[tuple[str, str]]] = {}
    by_model: dict[str, dict[str, list[str]]] = {}
    for rel in unlisted:
        split = split_tagged(rel)
        if split is not None:
            logical = split[0]
            if logical in layout.logicals and logical.endswith(PENDING_FORMATS):
                by_logical.setdefault(logical, []).append((rel, split[1]))
            else:
                refused.append(rel)
            continue
        match = (ENGINE_NAME.match(rel.removeprefix(ENGINES_DIR + "/"))
                 if rel.startswith(ENGINES_DIR + "/") else None)
        if match is not None and match["model"] in layout.models:
            by_model.setdefault(match["model"], {}).setdefault(match["key"], []).append(rel)
        else:
            refused.append(rel)
    for logical, found in by_logical.items():
        cap = PENDING_GROWTH * layout.logicals[logical] + PENDING_SLACK
        ok = len(found) == 1 and _pending_artifact(root, *found[0], cap)
        (accepted if ok else refused).extend(rel for rel, _ in found)
    for model, keys in by_model.items():
        cap = PENDING_GROWTH * layout.models[model] + PENDING_SLACK
        for key, rels in keys.items():
            good = _pending_engine(root, model, key, rels, cap) if len(keys) == 1 else set()
            accepted.extend(rel for rel in rels if rel in good)
            refused.extend(rel for rel in rels if rel not in good)
    return sorted(accepted), sorted(refused)


def _open_bounded(path: Path, cap: int) -> tuple[int, int] | None:
    """(fd, size) of a regular, singly linked, not setuid file of at most `cap` bytes, opened
    without following a symlink or blocking on a FIFO; None (nothing left open) otherwise."""
    try:
        fd = os.open(path, OPEN_FLAGS)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        return None
    if (not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_mode & GROUND_BAD_BITS
            or st.st_size > cap):
        os.close(fd)
        return None
    return fd, st.st_size


def _pending_artifact(root: Path, rel: str, tag: str, cap: int) -> bool:
    """A shard, index file or tile list that parses as its format and whose blake3 starts with its
    tag."""
    opened = _open_bounded(root / rel, cap)
    if opened is None:
        return False
    fd, size = opened
    try:
        if rel.endswith(".json"):
            return _list_ok(os.pread(fd, size + 1, 0), size) and hash_fd(fd, size).startswith(tag)
        head = os.pread(fd, min(size, _NPY_HEAD), 0)
        parses = _npy_ok(head, size) if rel.endswith(".npy") else _faiss_ok(head)
        return parses and hash_fd(fd, size).startswith(tag)
    except OSError:
        return False
    finally:
        os.close(fd)


def _npy_ok(head: bytes, size: int) -> bool:
    """An .npy header (version 1 or 2, no Python objects) whose shape and dtype account for every
    byte of the file: read with numpy's header reader, nothing loaded."""
    import io
    import math

    from numpy.lib import format as npy  # only here: the verifier imports no numpy otherwise

    fp = io.BytesIO(head)
    try:
        version = npy.read_magic(fp)
        if version == (1, 0):
            shape, _, dtype = npy.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, _, dtype = npy.read_array_header_2_0(fp)
        else:
            return False
    except Exception:  # noqa: BLE001 - any failure to parse is a verdict, never a traceback
        return False
    return not dtype.hasobject and fp.tell() + math.prod(shape) * dtype.itemsize == size


def _list_ok(data: bytes, size: int) -> bool:
    """A tile list's shape: one strict JSON object of its block and tiles (the next build commits or
    removes it; nothing reads its tiles before a root signs it)."""
    try:
        body = strict_loads(data, max_depth=4, max_bytes=size)
    except StrictJSONError:
        return False
    return isinstance(body, dict) and body.keys() == {"block", "tiles"}


def _faiss_ok(head: bytes) -> bool:
    """FAISS writes a four-character code of the index type first (IxFI, IxF2, IHNf, IwFl...)."""
    return len(head) >= 8 and head[:1] == b"I" and head[1:4].isalnum() and head[1:4].isascii()


def _pending_engine(root: Path, model: str, key: str, rels: list[str], cap: int) -> set[str]:
    """Which of `rels` (the unlisted files of one engine key) are pending: the sidecar if it proves
    its name (alone: a kill before the engine was moved in), and the one engine of its key if its
    size and blake3 are the ones the sidecar records."""
    stem = f"{ENGINES_DIR}/{model}-{key}"
    engines = [rel for rel in rels if rel != f"{stem}.json"]
    if len(engines) > 1 or len(engines) == len(rels):  # two engines of one key, or no sidecar
        return set()
    sidecar = _engine_sidecar(root / f"{stem}.json", model, key)
    if sidecar is None:
        return set()
    good = {f"{stem}.json"}
    want_size, want_hash = sidecar.get("engine_size"), sidecar.get("engine_blake3")
    if not engines or type(want_size) is not int or not isinstance(want_hash, str) \
            or want_size > cap:
        return good
    opened = _open_bounded(root / engines[0], cap)
    if opened is None:
        return good
    fd, size = opened
    try:
        if size == want_size and hash_fd(fd, size) == want_hash:
            good.add(engines[0])
    except OSError:
        pass
    finally:
        os.close(fd)
    return good


def _engine_sidecar(path: Path, model: str, key: str) -> dict | None:
    """A sidecar of at most SIDECAR_MAX bytes, strict JSON, whose key material hashes to `key` (the
    name it carries), else None."""
    opened = _open_bounded(path, SIDECAR_MAX)
    if opened is None:
        return None
    fd, size = opened
    try:
        data = os.pread(fd, size + 1, 0)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        sidecar = strict_loads(data, max_depth=SIDECAR_DEPTH, max_bytes=SIDECAR_MAX)
        ok = (isinstance(sidecar, dict) and sidecar.get("model", model) == model
              and sidecar.get("key") == key == key_digest(sidecar["material"]))
    except (StrictJSONError, KeyError, TypeError, ValueError, RecursionError):
        return None
    return sidecar if ok else None
