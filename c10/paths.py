"""The cache layout: where each derived artifact lives, relative to the cache root (no heavy imports)."""
from __future__ import annotations

import fnmatch
import re

MANIFEST_NAME = "Manifest.json"
ENVELOPE_NAME = "Manifest.json.dsse"
# Files at the cache root that the build owns but never ships in the Manifest.
CONTROL_FILES = frozenset({"dodo.py", "c10.toml", ".c10.lock", MANIFEST_NAME, ENVELOPE_NAME})
CONTROL_DIR = ".c10"  # the build's private dir: everything under it is control
STAGING_DIR = f"{CONTROL_DIR}/tmp"  # temp files of shipped files: a kill leaves none where verify looks
# doit imports dodo.py, so Python writes exactly this bytecode file beside it.
CONTROL_PYCACHE = "__pycache__/dodo.cpython-*.pyc"

ENGINES_DIR = "engines"
# What c10 writes into engines/: {model}-{64-hex key}.{onnx,blob,plan} and its .json sidecar.
ENGINE_NAME = re.compile(r"^(?P<model>[A-Za-z0-9_.-]+)-(?P<key>[0-9a-f]{64})\.(?P<ext>onnx|blob|plan|json)$")
SHARDS_DIR = "shards"
INDEX_DIR = "index"


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
    if relpath in CONTROL_FILES or relpath.startswith(CONTROL_DIR + "/"):
        return True
    return relpath.count("/") == 1 and fnmatch.fnmatchcase(relpath, CONTROL_PYCACHE)
