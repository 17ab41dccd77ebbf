"""The cache layout: where each derived artifact lives, relative to the cache root (no heavy imports)."""
from __future__ import annotations

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
