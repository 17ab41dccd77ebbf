"""doit's file check by blake3 content hash, through the stat fast path of c10's hash cache."""
from __future__ import annotations

import os

from doit.dependency import FileChangedChecker

from c10.rules import session
from c10.store.hashcache import stat_key


class Blake3Checker(FileChangedChecker):
    """State is [size, mtime_ns, inode, ctime_ns, blake3]: a matching stat trusts the hash, else it
    is looked up or computed once through the shared hash cache (a mass `touch` costs one re-hash,
    ever)."""

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
