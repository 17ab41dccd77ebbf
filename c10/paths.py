"""The cache layout: where each derived artifact lives, relative to the cache root (no heavy imports)."""
from __future__ import annotations

import fnmatch

MANIFEST_NAME = "Manifest.json"
ENVELOPE_NAME = "Manifest.json.dsse"
# Files at the cache root that the build owns but never ships in the Manifest.
CONTROL_FILES = frozenset({"dodo.py", "c10.toml", ".c10.lock", MANIFEST_NAME, ENVELOPE_NAME})
CONTROL_DIR = ".c10"  # the build's private dir: everything under it is control
# doit imports dodo.py, so Python writes exactly this bytecode file beside it.
CONTROL_PYCACHE = "__pycache__/dodo.cpython-*.pyc"

ENGINES_DIR = "engines"
SHARDS_DIR = "shards"
INDEX_DIR = "index"


def shard_relpath(model: str, block: tuple[int, int, int]) -> str:
    """shards/{model}/{z}/{bx}-{by}.npy"""
    z, bx, by = block
    return f"{SHARDS_DIR}/{model}/{z}/{bx}-{by}.npy"


def index_relpaths(model: str) -> tuple[str, str]:
    """(FAISS index, row -> tile id array) of a model."""
    return f"{INDEX_DIR}/{model}.faiss", f"{INDEX_DIR}/{model}.ids.npy"


def is_control(relpath: str) -> bool:
    """True for a cache-relative POSIX path that is allowed without being in the Manifest."""
    if relpath in CONTROL_FILES or relpath.startswith(CONTROL_DIR + "/"):
        return True
    return relpath.count("/") == 1 and fnmatch.fnmatchcase(relpath, CONTROL_PYCACHE)
