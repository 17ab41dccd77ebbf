"""doit's file check by blake3 content hash (hash cache stat fast path); tiles by block key."""
from __future__ import annotations

import inspect
import os

from doit.dependency import FileChangedChecker

from c10.rules import session
from c10.store.hashcache import stat_key
from c10.store.layout import TILES_DIR

_TILES = TILES_DIR + "/"


class Blake3Checker(FileChangedChecker):
    """State is [size, mtime_ns, inode, ctime_ns, blake3]: a matching stat trusts the hash, else it
    is looked up or computed once through the shared hash cache (a mass `touch` costs one re-hash,
    ever)."""

    def __init__(self) -> None:
        self._tile_stats: dict[str, os.stat_result] = {}

    def info(self, file_path):
        """os.stat, once per run for a tile: a tile is a file_dep of its block's shard and of up to
        three window shards (shards.stride < 1), and no task writes under tiles/. Every other file
        (refs the shard tasks write, models) is stat'ed each time it is asked."""
        if not file_path.startswith(_TILES):
            return os.stat(file_path)
        st = self._tile_stats.get(file_path)
        if st is None:
            st = self._tile_stats[file_path] = os.stat(file_path)
        return st

    def check_modified(self, file_path, file_stat, state):
        if type(state) is not list or len(state) != 5:
            return True  # a state from another checker: decide again by content
        # stat_key() spelled out, mtime first: this runs once per tile on every no-op
        if state[1] == file_stat.st_mtime_ns and state[0] == file_stat.st_size \
                and state[3] == file_stat.st_ctime_ns and state[2] == file_stat.st_ino:
            return False
        return session.current().hashes.hash(file_path, file_stat)[0] != state[4]

    def get_state(self, dep, current_state):
        st = os.stat(dep)
        if isinstance(current_state, list) and len(current_state) == 5 \
                and tuple(current_state[:4]) == stat_key(st):
            return None
        return [*stat_key(st), session.current().hashes.hash(dep, st)[0]]


class TileState:
    """doit uptodate of a shard or window task: the content key of the tiles it reads
    (c10.store.blockstate), decided from the load-time scan instead of one file_dep per tile.
    Computed once, when doit asks (before the action runs: a tile changed meanwhile makes the
    next key differ), and saved with the task's values after a success."""

    NAME = "tiles"

    def __init__(self, compute):
        self._compute, self._key = compute, None
        self.__name__ = "tiles_current"  # what `c10 status` calls it
        self.__signature__ = _SIGNATURE  # doit inspects every uptodate callable on every run

    def configure_task(self, task) -> None:
        task.value_savers.append(lambda: {self.NAME: self.key()})

    def key(self) -> str:
        if self._key is None:
            self._key = self._compute()
        return self._key

    def __call__(self, task, values) -> bool:
        return values.get(self.NAME) == self.key()


def _signature(task, values):  # the parameters doit passes to an uptodate callable
    pass


_SIGNATURE = inspect.signature(_signature)
