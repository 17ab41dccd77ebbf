"""blake3's thread pool and fork: a process forked after a multi-threaded hash still hashes."""
from __future__ import annotations

import multiprocessing
import os

import pytest

from c10.store.digest import MMAP_MIN, blake3_file


def _hash_in_child(path: str, out) -> None:
    out.send(blake3_file(path))


@pytest.mark.timeout(60)
def test_a_child_forked_after_a_threaded_hash_hashes_a_big_file(tmp_path):
    # c10 pack copies big files with blake3's threads, then verifies the image in forked
    # processes: the child inherits the thread pool's state but none of its threads
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(4 * MMAP_MIN))
    expected = blake3_file(big)  # starts blake3's thread pool in this process
    reader, writer = multiprocessing.get_context("fork").Pipe(duplex=False)
    child = multiprocessing.get_context("fork").Process(target=_hash_in_child,
                                                        args=(str(big), writer))
    child.start()
    try:
        assert reader.poll(30), "the forked child never finished hashing (blake3 pool deadlock)"
        assert reader.recv() == expected
    finally:
        child.kill()
        child.join()
