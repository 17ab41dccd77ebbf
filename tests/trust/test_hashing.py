"""The listed files' bytes checked in worker processes (or one thread): the same verdict either way,
the first failure in path order, named."""
from __future__ import annotations

import threading

import blake3
import pytest

from c10.errors import VerifyError
from c10.trust import hashing


def listed(tmp_path, n: int) -> list[dict]:
    files = []
    for i in range(n):
        rel = f"tiles/15/{i // 100}/{i % 100}.jpg"
        data = i.to_bytes(4, "little") * 3
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
        files.append({"path": rel, "size": len(data), "blake3": blake3.blake3(data).hexdigest()})
    return sorted(files, key=lambda f: f["path"])


@pytest.mark.parametrize("busy", [False, True])  # True: another thread runs, so no fork
def test_processes_and_one_thread_give_the_same_verdict(tmp_path, busy):
    files = listed(tmp_path, hashing.PROCESS_MIN_FILES + 100)
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, daemon=True)
    if busy:
        other.start()
    try:
        total, side = hashing.check_contents(tmp_path, files, hashing.GROUND_BAD_BITS,
                                             lambda: "walked")
        assert total == sum(f["size"] for f in files) and side == "walked"
        bad = [files[-50], files[77]]
        for f in bad:
            (tmp_path / f["path"]).write_bytes(b"x" * f["size"])
        with pytest.raises(VerifyError) as info:
            hashing.check_contents(tmp_path, files, hashing.GROUND_BAD_BITS, lambda: None)
        assert info.value.reason == "hash-mismatch" and info.value.path == files[77]["path"]
    finally:
        stop.set()
