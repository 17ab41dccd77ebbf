"""The cache layout: every name c10 reads or writes under a cache root, in one place."""
from __future__ import annotations

import re

# --- control files: the build's own, never shipped in the Manifest --------------------------
CONFIG_NAME = "c10.toml"           # the build request
# `doit` without doit.cfg reads it, and is told to restore doit.cfg
DODO_NAME = "dodo.py"
DOIT_CFG_NAME = "doit.cfg"         # names c10's loader: doit then imports nothing from the cache
LOCK_NAME = ".c10.lock"            # the build lock (flock; never deleted)
MANIFEST_NAME = "Manifest.json"
ENVELOPE_NAME = "Manifest.json.dsse"
CONTROL_FILES = frozenset({DODO_NAME, DOIT_CFG_NAME, CONFIG_NAME, LOCK_NAME, MANIFEST_NAME,
                           ENVELOPE_NAME})
CONTROL_DIR = ".c10"               # the build's private dir: everything under it is control
# temp files of shipped files: a kill leaves none where verify looks
STAGING_DIR = f"{CONTROL_DIR}/tmp"
DEP_FILE = f"{CONTROL_DIR}/doit.sqlite"
LOCK_HOLDER = f"{CONTROL_DIR}/lock-holder.json"
REPORT_PATH = f"{CONTROL_DIR}/report.json"
SCAN_MEMO = f"{CONTROL_DIR}/tiles-scan.json"
# the Manifest pair's stat when a build last found it intact (c10.trust.manifest.committed_intact)
COMMIT_MEMO = f"{CONTROL_DIR}/commit-stat.json"
# block -> (its tiles' content key, its tile list) when the last Manifest was written: a hint that
# lets the next one reuse an unchanged block's signed list instead of rebuilding it
LISTS_MEMO = f"{CONTROL_DIR}/tilelists-memo.json"
# tile list blake3 -> its tiles' blake3 prefixes (c10.store.listkeys): the descriptor store's hint
LIST_KEYS = f"{CONTROL_DIR}/tilelist-keys.bin"
# Two hash caches: the big one of tiles is loaded only when a tile's stat changed; the small one
# (models, engines, shards...) is read on every graph load to key engines.
HASH_CACHES = {"tiles": f"{CONTROL_DIR}/hashes-tiles.json", "other": f"{CONTROL_DIR}/hashes.json"}
# The tiles' hash cache, one file per column directory tiles/{z}/{x}: a build loads and rewrites
# only the columns whose tiles it hashed (hashes-tiles.json, one file for all, is read once to
# migrate an older cache, then removed).
TILE_HASHES_DIR = f"{CONTROL_DIR}/tilehashes"


def tile_hashes_relpath(z: str, x: str) -> str:
    """.c10/tilehashes/{z}/{x}.json: the hash cache of the tiles of column tiles/{z}/{x}"""
    return f"{TILE_HASHES_DIR}/{z}/{x}.json"

# --- inputs and derived files ------------------------------------------------------------------
TILES_DIR = "tiles"
TILE_EXTS = frozenset({"jpg", "jpeg", "png", "webp"})
MODELS_DIR = "models"
ENGINES_DIR = "engines"
# What c10 writes into engines/: {model}-{64-hex key}.{onnx,blob,plan} and its .json sidecar.
ENGINE_NAME = re.compile(r"^(?P<model>[A-Za-z0-9_.-]+)-(?P<key>[0-9a-f]{64})"
                         r"\.(?P<ext>onnx|blob|plan|json)$")
SHARDS_DIR = "shards"
INDEX_DIR = "index"
# The Manifest's tile lists (schema 3): tilelists/{z}/{bx}-{by}.{tag}.json, one per block, written
# by the manifest task (c10.trust.tilelists); shipped and signed through the root, never a ref.
LISTS_DIR = "tilelists"
# Wholly owned by the graph: an undeclared file here is a dead output and is removed by the build.
OWNED_DIRS = (SHARDS_DIR, INDEX_DIR, LISTS_DIR)
# Derived dirs where a killed writer may have left an atomic-write temp file.
DERIVED_DIRS = (ENGINES_DIR, SHARDS_DIR, INDEX_DIR, LISTS_DIR)
# What may be content-named (tagged_relpath): shards, index files, tile lists
TAGGED_DIRS = (SHARDS_DIR, INDEX_DIR, LISTS_DIR)


def shard_relpath(model: str, block: tuple[int, int, int]) -> str:
    """shards/{model}/{z}/{bx}-{by}.npy"""
    z, bx, by = block
    return f"{SHARDS_DIR}/{model}/{z}/{bx}-{by}.npy"


WINDOWS_SUFFIX = ".windows.npy"


def window_relpath(model: str, block: tuple[int, int, int]) -> str:
    """shards/{model}/{z}/{bx}-{by}.windows.npy: the retrieval windows of a block
    (c10.features.windows)."""
    z, bx, by = block
    return f"{SHARDS_DIR}/{model}/{z}/{bx}-{by}{WINDOWS_SUFFIX}"


def list_relpath(block: tuple[int, int, int]) -> str:
    """tilelists/{z}/{bx}-{by}.json: the logical path of a block's tile list."""
    z, bx, by = block
    return f"{LISTS_DIR}/{z}/{bx}-{by}.json"


_SHARD_BLOCK = re.compile(rf"{SHARDS_DIR}/[^/]+/(\d+)/(\d+)-(\d+)\.npy")


def shard_block(logical: str) -> tuple[int, int, int] | None:
    """(z, bx, by) of a per-block shard's logical path (shard_relpath), None for anything else."""
    m = _SHARD_BLOCK.fullmatch(logical)
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def index_relpaths(model: str) -> tuple[str, str]:
    """(FAISS index, row -> tile id array) of a model."""
    return f"{INDEX_DIR}/{model}.faiss", f"{INDEX_DIR}/{model}.ids.npy"


def trained_relpaths(model: str) -> tuple[str, str]:
    """(trained empty IVF index, what it was trained on) of a model with an IVF index."""
    return f"{INDEX_DIR}/{model}.trained.faiss", f"{INDEX_DIR}/{model}.trained.json"


# Shards and index files are named by their content (TUF's consistent snapshots): a build writes
# new names beside the committed ones, so a kill never touches a file the last Manifest lists.
# The build finds its current files through refs, small control files named by the logical path.
REFS_DIR = f"{CONTROL_DIR}/refs"
TAG_LEN = 16  # hex digits of the file's blake3 in its name
_TAGGED = re.compile(r"^(?P<stem>.+)\.(?P<tag>[0-9a-f]{%d})(?P<ext>\.[a-z]+)$" % TAG_LEN)


def tagged_relpath(logical: str, blake3_hex: str) -> str:
    """shards/g/15/1-2.npy + digest -> shards/g/15/1-2.{digest[:16]}.npy"""
    stem, dot, ext = logical.rpartition(".")
    return f"{stem}.{blake3_hex[:TAG_LEN]}{dot}{ext}"


def split_tagged(relpath: str) -> tuple[str, str] | None:
    """(logical path, tag) of a content-named file under shards/, index/ or tilelists/, else
    None."""
    if not relpath.startswith(tuple(d + "/" for d in TAGGED_DIRS)):
        return None
    m = _TAGGED.match(relpath)
    return (m["stem"] + m["ext"], m["tag"]) if m else None


def ref_relpath(logical: str) -> str:
    """.c10/refs/{logical}.json: the doit target that names a logical artifact's current files."""
    return f"{REFS_DIR}/{logical}.json"


def is_control(relpath: str) -> bool:
    """True for a cache-relative POSIX path that is allowed without being in the Manifest."""
    return relpath in CONTROL_FILES or relpath.startswith(CONTROL_DIR + "/")


# Per-shard encodings of an IVF index (c10.features.ivf), a cache keyed by shard and quantizer,
# trusted only through the host's ledger: .c10/ivf/{model}/{quantizer tag}/{z}_{bx}-{by}[.windows]
# .{64-hex key}.rows
IVF_CACHE_DIR = f"{CONTROL_DIR}/ivf"


def ivf_encoding_relpath(model: str, quantizer: str, logical: str, key: str) -> str:
    """The encoding of shard `logical` with the quantizer of blake3 `quantizer`."""
    slug = logical.removeprefix(f"{SHARDS_DIR}/{model}/").removesuffix(".npy").replace("/", "_")
    return f"{IVF_CACHE_DIR}/{model}/{quantizer[:TAG_LEN]}/{slug}.{key}.rows"


# --- what .c10/ may hold: the ground verifier walks it and refuses any other name ---------------
# Paths relative to .c10/. Every one is a file c10 (or sqlite, for doit's DB) writes there.
DEP_SIDE_SUFFIXES = ("-journal", "-wal", "-shm")  # sqlite's own side files of the doit DB
_DEP_NAME = DEP_FILE.removeprefix(CONTROL_DIR + "/")
# Written atomically beside themselves: a kill may leave `.{name}.XXXXXXXX.tmp` (atomic_path).
CONTROL_DIR_WRITTEN = frozenset(p.removeprefix(CONTROL_DIR + "/") for p in (
    LOCK_HOLDER, REPORT_PATH, SCAN_MEMO, COMMIT_MEMO, LISTS_MEMO, LIST_KEYS,
    *HASH_CACHES.values()))
# Names earlier releases wrote there, which an upgraded cache may still hold.
_LEGACY = frozenset({"tiles-scan.marshal"})
CONTROL_DIR_FILES = CONTROL_DIR_WRITTEN | _LEGACY | {_DEP_NAME + s
                                                     for s in ("", *DEP_SIDE_SUFFIXES)}
# rules/depdb.py moves a DB sqlite cannot read aside: doit.sqlite.corrupt-{%Y%m%dT%H%M%S}-{pid}
_CORRUPT_DEP = re.compile(re.escape(_DEP_NAME) + r"\.corrupt-\d{8}T\d{6}-\d+"
                          + "(?:%s)?" % "|".join(DEP_SIDE_SUFFIXES))
# tempfile.mkstemp(prefix=".{name}.", suffix=".tmp"): the name, then 8 random characters
_TEMP_OF = re.compile(r"\.(?P<name>[^/]+)\.[A-Za-z0-9_]{8}\.tmp")
_REFS = REFS_DIR.removeprefix(CONTROL_DIR + "/")
_STAGING = STAGING_DIR.removeprefix(CONTROL_DIR + "/")
# One safe path component (no '/', no control character, not '.' or '..').
_PART = r"(?!\.\.?(?:/|$))[^/\x00-\x1f\\]+"
# refs/{logical}.json of a shard or index file (the build's doit targets)
_REF_FILE = re.compile(rf"{_REFS}/(?:{SHARDS_DIR}|{INDEX_DIR})(?:/{_PART})+\.json")
_REF_DIR = re.compile(rf"{_REFS}(?:/(?:{SHARDS_DIR}|{INDEX_DIR})(?:/{_PART})*)?")
_IVF = IVF_CACHE_DIR.removeprefix(CONTROL_DIR + "/")
_IVF_DIR = re.compile(rf"{_IVF}(?:/{_PART}(?:/[0-9a-f]{{{TAG_LEN}}})?)?")
_TILE_HASHES = TILE_HASHES_DIR.removeprefix(CONTROL_DIR + "/")
_TILE_HASHES_DIR = re.compile(rf"{_TILE_HASHES}(?:/{_PART})?")
_TILE_HASHES_FILE = re.compile(rf"{_TILE_HASHES}/{_PART}/{_PART}\.json")
_IVF_FILE = re.compile(rf"{_IVF}/{_PART}/[0-9a-f]{{{TAG_LEN}}}/{_PART}\.[0-9a-f]{{64}}\.rows")
# .c10/tmp/: staged temp files of any writer, and an engine compiled there before it is moved in
_STAGING_DIR_RE = re.compile(rf"{_STAGING}(?:/{_PART})*")


def is_control_dir_file(rel: str) -> bool:
    """True for a path relative to .c10/ that names a file c10 keeps there: the doit DB and its
    side files (and a corrupt one moved aside), the hash caches (tilehashes/ too), the report,
    the lock holder, the tile scan memo, a temp file of one of those, a ref, or a staged file in
    tmp/."""
    if rel in CONTROL_DIR_FILES:
        return True
    if "/" not in rel:
        temp = _TEMP_OF.fullmatch(rel)
        return (temp is not None and temp["name"] in CONTROL_DIR_WRITTEN) \
            or _CORRUPT_DEP.fullmatch(rel) is not None
    if rel.startswith(_REFS + "/"):
        return _REF_FILE.fullmatch(rel) is not None
    if rel.startswith(_IVF + "/"):
        return _IVF_FILE.fullmatch(rel) is not None
    if rel.startswith(_TILE_HASHES + "/"):
        return _TILE_HASHES_FILE.fullmatch(rel) is not None
    if rel.startswith(_STAGING + "/"):
        parent, _, name = rel.rpartition("/")
        if _STAGING_DIR_RE.fullmatch(parent) is None:
            return False
        return _TEMP_OF.fullmatch(name) is not None or (
            parent == f"{_STAGING}/{ENGINES_DIR}" and _is_engine_file(name))
    return False


def _is_engine_file(name: str) -> bool:
    match = ENGINE_NAME.match(name)
    return match is not None and match["ext"] != "json"


def is_control_dir_dir(rel: str) -> bool:
    """True for a directory (relative to .c10/) c10 makes there: refs/ and its tree of shard and
    index refs, tmp/ and its subdirectories, ivf/ and its model directories, tilehashes/ and its
    zoom directories."""
    return any(p.fullmatch(rel) is not None for p in (_REF_DIR, _STAGING_DIR_RE, _IVF_DIR,
                                                      _TILE_HASHES_DIR))
