"""Manifest schema 3: the tiles listed per block in signed tile lists, and the one file iterator."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Container, Iterable, Iterator

import blake3

from c10.canonical import canonical_json
from c10.errors import VerifyError
from c10.store import atomic
from c10.store.layout import (
    LISTS_DIR,
    LISTS_MEMO,
    MANIFEST_NAME,
    STAGING_DIR,
    TILE_EXTS,
    TILES_DIR,
    list_relpath,
    tagged_relpath,
)
from c10.trust.files import REBUILD, read_listed, read_regular
from c10.trust.strictjson import StrictJSONError, strict_loads

TREE_SCHEMA = 3  # the first schema whose root lists tile lists instead of tiles
LIST_KIND = "tile-list"
# A block of shards.block = 256 is 65536 tiles, ~8 MB of list: anything past this is refused unread.
LIST_MAX = 64 << 20
_INDEX = r"(0|[1-9]\d*)"  # a canonical decimal, as the build's tile scan reads one
# tilelists/{z}/{bx}-{by}.{16 hex}.json, as layout.list_relpath + tagged_relpath name it
_LIST_NAME = re.compile(rf"{LISTS_DIR}/{_INDEX}/{_INDEX}-{_INDEX}\.[0-9a-f]{{16}}\.json")
_TILE_PATH = re.compile(rf"{TILES_DIR}/{_INDEX}/{_INDEX}/{_INDEX}\.(?i:{'|'.join(TILE_EXTS)})")
_HEX64 = re.compile(r"[0-9a-f]{64}")


# ---------------------------------------------------------------- build

def dumps_tile_list(block: tuple[int, int, int], tiles: Iterable[tuple[str, int, str]]) -> bytes:
    """A block's tile list: canonical JSON {"block": [z, bx, by], "tiles": [[path, size, blake3]]},
    tiles sorted by path, one trailing newline. Equal tiles give equal bytes (and name)."""
    rows = sorted([path, size, digest] for path, size, digest in tiles)
    return canonical_json({"block": list(block), "tiles": rows}) + b"\n"


def write_tile_list(root: Path, block: tuple[int, int, int],
                    tiles: Iterable[tuple[str, int, str]]) -> tuple[str, int, str]:
    """(path, size, blake3) of the block's list, its file written atomically (made durable with
    the build's other writes before the root naming it is signed) unless one already holds these
    bytes: content-named, an unchanged block's list is the one already signed."""
    data = dumps_tile_list(block, tiles)
    digest = blake3.blake3(data).hexdigest()
    rel = tagged_relpath(list_relpath(block), digest)
    target = Path(root) / rel
    try:  # no symlink followed: a planted one is replaced, never taken for the list
        same = read_regular(target, len(data)) == data
    except OSError:
        same = False
    if not same:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic.replace_unsynced(target, data, staging=Path(root) / STAGING_DIR)
    return rel, len(data), digest


def tree_tiles_hash(list_entries: Iterable) -> str:
    """The tile set's id in schema 3: blake3 over the sorted (path, blake3) of the tile lists, which
    name their tiles' bytes (a flat Manifest hashes the tiles' own pairs)."""
    pairs = sorted((e.path, e.blake3) for e in list_entries if e.kind == LIST_KIND)
    return blake3.blake3(canonical_json(pairs)).hexdigest()


def read_lists_memo(root: Path) -> dict[str, list[str]]:
    """"z/bx/by" -> [block content key, tile list path] of the last Manifest write (LISTS_MEMO),
    {} when missing or malformed. A hint: a list it names is reused only if the last verified
    Manifest lists it and its bytes are the signed ones."""
    try:
        body = strict_loads((Path(root) / LISTS_MEMO).read_bytes(), max_depth=3)
    except (OSError, StrictJSONError):
        return {}
    blocks = body.get("blocks") if type(body) is dict else None
    if type(blocks) is not dict:
        return {}
    return {k: v for k, v in blocks.items() if type(v) is list and len(v) == 2
            and all(type(x) is str for x in v)}


def write_lists_memo(root: Path, blocks: dict[str, list[str]]) -> None:
    """Replace LISTS_MEMO atomically (a kill leaves the old one: at worst lists are rebuilt)."""
    atomic.write_bytes(Path(root) / LISTS_MEMO, canonical_json({"blocks": blocks}))


def block_name(block: tuple[int, int, int]) -> str:
    return "/".join(map(str, block))


# ---------------------------------------------------------------- root checks

def list_block(rel: str) -> tuple[int, int, int] | None:
    """(z, bx, by) a tile list's path names, None for a path that is not one."""
    m = _LIST_NAME.fullmatch(rel)
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def check_root(manifest: dict) -> None:
    """A schema-3 root: no tile listed directly, every tile-list entry named as one under
    tilelists/ and of bounded size, one per block, nothing else there, and a signed block size."""
    blocks: set[tuple[int, int, int]] = set()
    for entry in manifest["files"]:
        rel, kind = entry["path"], entry["kind"]
        if kind == "tile" or rel.startswith(TILES_DIR + "/"):
            raise _bad_root(f"{rel} is listed in the root; schema {TREE_SCHEMA} lists tiles only "
                            "in tile lists")
        if (kind == LIST_KIND) != rel.startswith(LISTS_DIR + "/"):
            raise _bad_root(f"{rel} is of kind {kind!r}; only {LISTS_DIR}/ holds tile lists, "
                            "and only tile lists")
        if kind != LIST_KIND:
            continue
        block = list_block(rel)
        if block is None or block in blocks:
            raise _bad_root(f"{rel} is not a tile list name, or a second list of its block")
        if entry["size"] > LIST_MAX:
            raise _bad_root(f"tile list {rel} is {entry['size']} bytes, above the {LIST_MAX} "
                            "allowed")
        blocks.add(block)
    if blocks:
        block_size(manifest)


def block_size(manifest: dict) -> int:
    """The signed block size (runtime.tiles.block) the tile lists are cut by."""
    try:
        size = manifest["runtime"]["tiles"]["block"]
    except (KeyError, TypeError):
        size = None
    if type(size) is not int or size < 1:
        raise _bad_root("runtime.tiles.block is missing or not an integer >= 1, so its tile lists "
                        "cannot be checked")
    return size


def _bad_root(what: str) -> VerifyError:
    return VerifyError("bad-manifest", f"Manifest.json is malformed: {what}; rebuild with "
                       f"`doit build_cache`", MANIFEST_NAME)


# ---------------------------------------------------------------- the iterator

def iter_files(root: Path, manifest: dict, skip_bad: bool = False) -> Iterator[dict]:
    """Every file entry of a verified Manifest, each a dict (path, size, blake3, kind): a flat
    one's `files` (schemas 1, 2); a tree's root entries, then each tile list's tiles, the list
    read once, checked against its root entry (size, blake3) and parsed strictly first. The one
    way verify, pack and the aircraft see a Manifest's files. skip_bad (a build carrying files
    forward): a list that fails is skipped, its tiles then simply not signed, instead of raised."""
    yield from manifest["files"]
    if manifest["schema_version"] < TREE_SCHEMA:
        return
    size = None
    for entry in manifest["files"]:
        if entry["kind"] == LIST_KIND:
            size = size or block_size(manifest)
            try:
                tiles = parse_tile_list(read_listed(root, entry), entry["path"], size)
            except VerifyError:
                if not skip_bad:
                    raise
                continue
            yield from tiles


def signed_lists(root: Path, manifest: dict, skip: Container[str] = ()
                 ) -> Iterator[tuple[dict, bytes]]:
    """(root entry, bytes) of each tile list of a verified tree whose blake3 is not in `skip`,
    read and checked against its entry as iter_files does but not parsed (a build's hint of what
    its committed shards hold: a list that fails lists nothing)."""
    if manifest["schema_version"] < TREE_SCHEMA:
        return
    for entry in manifest["files"]:
        if entry["kind"] == LIST_KIND and entry["blake3"] not in skip:
            try:
                yield entry, read_listed(root, entry)
            except VerifyError:
                continue


def expand_files(root: Path, manifest: dict) -> list[dict]:
    """iter_files as a list (what is checked file by file in path order needs all of it)."""
    if manifest["schema_version"] < TREE_SCHEMA:
        return manifest["files"]
    return list(iter_files(root, manifest))


def parse_tile_list(data: bytes, rel: str, block: int) -> list[dict]:
    """The tile entries of list `rel`, refused (bad-manifest, naming it) unless it is strict JSON
    of exactly the block its name says and tiles under tiles/{z}/ inside that block, sorted, each
    once."""
    named = list_block(rel)
    if named is None:
        raise _bad_list(rel, "not a tile list name")
    z, bx, by = named
    try:
        # no depth walk: every level is type-checked below
        body = strict_loads(data, max_depth=None, max_bytes=LIST_MAX)
    except StrictJSONError as exc:
        raise _bad_list(rel, f"not strict UTF-8 JSON ({exc})") from None
    if type(body) is not dict or body.keys() != {"block", "tiles"} \
            or body["block"] != [z, bx, by] or type(body["tiles"]) is not list:
        raise _bad_list(rel, f"not {{\"block\": [{z}, {bx}, {by}], \"tiles\": [...]}}")
    out, prev = [], ""
    for row in body["tiles"]:
        if type(row) is not list or len(row) != 3:
            raise _bad_list(rel, f"tile row {row!r} is not [path, size, blake3]")
        path, size, digest = row
        m = _TILE_PATH.fullmatch(path) if type(path) is str else None
        if m is None or int(m[1]) != z or int(m[2]) // block != bx or int(m[3]) // block != by:
            raise _bad_list(rel, f"{path!r} is not a tile of block {z}/{bx}-{by} under "
                            f"{TILES_DIR}/")
        if path <= prev:
            raise _bad_list(rel, f"{path} is listed twice or out of order")
        if type(size) is not int or size < 0 or type(digest) is not str \
                or not _HEX64.fullmatch(digest):
            raise _bad_list(rel, f"{path}: size or blake3 malformed")
        out.append({"path": path, "size": size, "blake3": digest, "kind": "tile"})
        prev = path
    return out


def _bad_list(rel: str, what: str) -> VerifyError:
    return VerifyError("bad-manifest", f"tile list {rel} is malformed: {what}; {REBUILD}", rel)
