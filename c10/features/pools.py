"""Process-wide thread pools: started once, not per shard, and forgotten in a forked child."""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

_POOLS: dict[tuple[str, int], ThreadPoolExecutor] = {}
_LOCK = threading.Lock()


def worker_pool(name: str, threads: int) -> ThreadPoolExecutor:
    """The process's pool `name` of `threads` threads (a thread start costs ms on a busy host)."""
    with _LOCK:
        key = (name, max(1, threads))
        if key not in _POOLS:
            _POOLS[key] = ThreadPoolExecutor(key[1], f"c10-{name}")
        return _POOLS[key]


def _forget() -> None:
    """In a forked child (`doit -n N` workers): the parent's threads and lock state did not come
    along."""
    global _LOCK
    _POOLS.clear()
    _LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget)
