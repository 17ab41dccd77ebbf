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
SCAN_MEMO = f"{CONTROL_DIR}/tiles-scan.marshal"
# Two hash caches: the big one of tiles is loaded only when a tile's stat changed; the small one
# (models, engines, shards...) is read on every graph load to key engines.
HASH_CACHES = {"tiles": f"{CONTROL_DIR}/hashes-tiles.json", "other": f"{CONTROL_DIR}/hashes.json"}

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
# Wholly owned by the graph: an undeclared file here is a dead output and is removed by the build.
OWNED_DIRS = (SHARDS_DIR, INDEX_DIR)
# Derived dirs where a killed writer may have left an atomic-write temp file.
DERIVED_DIRS = (ENGINES_DIR, SHARDS_DIR, INDEX_DIR)


def shard_relpath(model: str, block: tuple[int, int, int]) -> str:
    """shards/{model}/{z}/{bx}-{by}.npy"""
    z, bx, by = block
    return f"{SHARDS_DIR}/{model}/{z}/{bx}-{by}.npy"


def index_relpaths(model: str) -> tuple[str, str]:
    """(FAISS index, row -> tile id array) of a model."""
    return f"{INDEX_DIR}/{model}.faiss", f"{INDEX_DIR}/{model}.ids.npy"


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
    """(logical path, tag) of a content-named file under shards/ or index/, else None."""
    if not relpath.startswith((SHARDS_DIR + "/", INDEX_DIR + "/")):
        return None
    m = _TAGGED.match(relpath)
    return (m["stem"] + m["ext"], m["tag"]) if m else None


def ref_relpath(logical: str) -> str:
    """.c10/refs/{logical}.json: the doit target that names a logical artifact's current files."""
    return f"{REFS_DIR}/{logical}.json"


def is_control(relpath: str) -> bool:
    """True for a cache-relative POSIX path that is allowed without being in the Manifest."""
    return relpath in CONTROL_FILES or relpath.startswith(CONTROL_DIR + "/")
