"""The verifier's tree, from the attacker's side: every way to smuggle bytes past `c10 verify` into
a cache (.c10/, modes, empty dirs, pending names, engine pairs, many or huge files) is refused
with its named reason, and what is refused by name is never opened nor hashed."""
from __future__ import annotations

import io
import json
import os
import stat
import time
import tracemalloc
from pathlib import Path

import blake3
import numpy as np
import pytest
from test_verify import Cache, flight_image

from c10.canonical import digest
from c10.store.layout import CONTROL_DIR, SCAN_MEMO, tagged_relpath
from c10.trust import tree
from c10.trust.manifest import FileEntry
from c10.trust.verify import EXIT_CODES

AIRBORNE = {"onnxruntime": "ort-1.31-x86_64"}  # the hand-built cache's engine fingerprint
LOGICAL = "shards/net/18/0-0.npy"  # the shard logical path the hand-built Manifest lists
ENGINE_ENTRY = {"path": "engines/net-abc123.onnx", "model": "net", "backend": "onnxruntime",
                "fingerprint": "ort-1.31-x86_64"}


@pytest.fixture
def cache(tmp_path):
    (tmp_path / "cache").mkdir()
    c = Cache(tmp_path / "cache", tmp_path / "keys")
    c.sign(c.manifest(engines=[ENGINE_ENTRY]))  # engine entries name their model
    return c


@pytest.fixture
def image(cache):
    """The hand-built cache as a flight image (what `c10 pack` writes)."""
    return flight_image(cache)


@pytest.fixture
def opened(monkeypatch):
    """Every path os.open is asked for during the test (the verifier's threads included)."""
    seen: list[str] = []
    real = os.open

    def recording(path, *args, **kw):
        seen.append(os.fsdecode(path))
        return real(path, *args, **kw)

    monkeypatch.setattr(os, "open", recording)
    return seen


def refused(cache, reason: str, path: str | None = None, **kw) -> None:
    from c10.errors import VerifyError

    with pytest.raises(VerifyError) as info:
        cache.verify(**kw)
    assert (info.value.reason, info.value.exit_code) == (reason, EXIT_CODES[reason]), info.value
    if path is not None:
        assert info.value.path == path, info.value


def never_opened(opened: list[str], rel: str) -> None:
    assert not [p for p in opened if p.endswith("/" + rel)], f"{rel} was opened"


def write(root: Path, rel: str, data: bytes = b"x") -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def npy(values, dtype=np.float32) -> bytes:
    out = io.BytesIO()
    np.save(out, np.asarray(values, dtype=dtype), allow_pickle=True)
    return out.getvalue()


def pending(root: Path, logical: str, data: bytes) -> str:
    """Write `data` under the content name of `logical` (tag: the first 16 hex of its blake3)."""
    rel = tagged_relpath(logical, blake3.blake3(data).hexdigest())
    write(root, rel, data)
    return rel


def hashes(monkeypatch) -> list[int]:
    """The sizes of the files the verifier hashes with hash_fd from now on."""
    sizes, real = [], tree.hash_fd

    def recording(fd, size, head=b""):
        sizes.append(size)
        return real(fd, size, head)

    monkeypatch.setattr(tree, "hash_fd", recording)
    return sizes


def sparse(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.truncate(size)
    return path


def test_bad_mode_has_a_new_exit_code():
    assert EXIT_CODES["bad-mode"] == 58
    assert len(set(EXIT_CODES.values())) == len(EXIT_CODES)


# ---------------------------------------------------------------- .c10/ on the ground

def test_every_name_c10_writes_into_its_control_dir_is_accepted(cache):
    key = "ab" * 32
    for rel in ("doit.sqlite", "doit.sqlite-journal", "doit.sqlite-wal", "doit.sqlite-shm",
                "doit.sqlite.corrupt-20260301T120000-4242",
                "doit.sqlite.corrupt-20260301T120000-4242-wal", "hashes.json",
                "hashes-tiles.json", "report.json", "lock-holder.json",
                SCAN_MEMO.removeprefix(CONTROL_DIR + "/"),
                ".hashes.json.k2j4h5g6.tmp", "refs/shards/net/18/0-0.npy.json",
                "refs/index/net.faiss.json", "refs/index/net.ids.npy.json",
                "tmp/.0-0.a1b2c3d4e5f6a7b8.npy.x1y2z3w4.tmp", f"tmp/engines/net-{key}.onnx",
                f"tmp/engines/.net-{key}.json.q1w2e3r4.tmp"):
        write(cache.root / ".c10", rel)
    (cache.root / ".c10/refs/shards/net/17").mkdir(parents=True)  # dirs c10 makes, even empty
    assert cache.verify().pending == 0


@pytest.mark.parametrize("rel", [".c10/logs/build.log", ".c10/evil.so", ".c10/deps.db",
                                 ".c10/hashes.json.bak", ".c10/refs/evil.json",
                                 ".c10/refs/shards/net/18/0-0.npy", ".c10/tmp/payload.bin",
                                 ".c10/tmp/engines/net-abc.onnx", ".c10/.evil.abcdefgh.tmp",
                                 ".c10/__pycache__/x.pyc"])
def test_an_unknown_name_in_the_control_dir_is_an_extra_file(cache, rel, opened):
    write(cache.root, rel)
    top = rel if rel.count("/") == 1 or rel.startswith((".c10/refs/", ".c10/tmp/")) else \
        rel.rpartition("/")[0]
    refused(cache, "extra-file", top)
    never_opened(opened, rel)


def test_an_unknown_dir_in_the_control_dir_is_an_extra_file_even_empty(cache):
    (cache.root / ".c10" / "plugins").mkdir()
    refused(cache, "extra-file", ".c10/plugins")


@pytest.mark.parametrize("name", ["report.json", "unknown"])
def test_a_symlink_in_the_control_dir(cache, name, tmp_path):
    (tmp_path / "outside").write_bytes(b"{}")
    (cache.root / ".c10" / name).symlink_to(tmp_path / "outside")
    refused(cache, "symlink", f".c10/{name}")


@pytest.mark.parametrize("name", ["report.json", "tmp/fifo"])
def test_a_fifo_in_the_control_dir(cache, name, opened):
    os.mkfifo(cache.root / ".c10" / name)
    refused(cache, "special-file", f".c10/{name}")
    never_opened(opened, f".c10/{name}")


def test_a_setuid_binary_in_the_control_dir(cache):
    path = write(cache.root, ".c10/report.json", b"\x7fELF...")
    path.chmod(0o4755)
    refused(cache, "bad-mode", ".c10/report.json")
    path.chmod(0o2755)
    refused(cache, "bad-mode", ".c10/report.json")
    path.rename(cache.root / ".c10/sh")
    refused(cache, "extra-file", ".c10/sh")


def test_a_setuid_control_file_at_the_top(cache):
    (cache.root / "dodo.py").chmod(0o4755)
    refused(cache, "bad-mode", "dodo.py")


# ---------------------------------------------------------------- modes of listed files

@pytest.mark.parametrize("mode", [0o4644, 0o2644, 0o6755])
def test_a_setuid_or_setgid_listed_file(cache, mode):
    (cache.root / "tiles/18/1/1.jpg").chmod(mode)
    refused(cache, "bad-mode", "tiles/18/1/1.jpg")  # on the ground
    flight_image(cache)
    (cache.root / "tiles/18/1/1.jpg").chmod(mode)
    refused(cache, "bad-mode", "tiles/18/1/1.jpg", airborne_fingerprints=AIRBORNE)


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666])
def test_a_group_or_world_writable_listed_file_under_airborne(image, mode):
    (image.root / "engines/net-abc123.onnx").chmod(mode)
    image.verify()  # the ground allows a shared workspace (umask 002)
    refused(image, "bad-mode", "engines/net-abc123.onnx", airborne_fingerprints=AIRBORNE)


def test_a_group_writable_directory_or_manifest_under_airborne(image):
    (image.root / "tiles/18").chmod(0o775)
    refused(image, "bad-mode", "tiles/18", airborne_fingerprints=AIRBORNE)
    (image.root / "tiles/18").chmod(0o755)
    (image.root / "Manifest.json.dsse").chmod(0o666)
    refused(image, "bad-mode", "Manifest.json.dsse", airborne_fingerprints=AIRBORNE)
    (image.root / "Manifest.json.dsse").chmod(0o644)
    image.root.chmod(0o777)
    refused(image, "bad-mode", ".", airborne_fingerprints=AIRBORNE)


# ---------------------------------------------------------------- airborne: exactly the image

def test_the_flight_image_verifies_airborne(image):
    assert image.verify(airborne_fingerprints=AIRBORNE).pending == 0


def test_the_build_workspace_is_refused_airborne(cache):
    refused(cache, "extra-file", airborne_fingerprints=AIRBORNE)


@pytest.mark.parametrize("rel", ["c10.toml", "dodo.py", "doit.cfg", ".c10.lock",
                                 ".c10/doit.sqlite", "tiles/18/1/3.jpg", "notes.txt"])
def test_any_unlisted_file_in_an_image_is_extra_and_never_opened(image, rel, opened):
    write(image.root, rel, b"[area]\n")
    refused(image, "extra-file", rel.partition("/")[0] if rel.startswith(".c10/") else rel,
            airborne_fingerprints=AIRBORNE)
    never_opened(opened, rel)


def test_a_pending_file_in_an_image_is_extra_and_never_opened(image, opened):
    rel = pending(image.root, LOGICAL, npy([1.0, 2.0]))
    image.verify()  # the ground takes it for a stopped build's
    opened.clear()
    refused(image, "extra-file", rel, airborne_fingerprints=AIRBORNE)
    never_opened(opened, rel)


@pytest.mark.parametrize("rel", ["tiles/19", "shards/net/17", ".c10", "tiles/18/1/empty"])
def test_an_empty_dir_in_an_image_is_extra(image, rel):
    (image.root / rel).mkdir(parents=True)
    image.verify()  # the ground allows empty dirs outside .c10/ (a removed tile leaves one)
    refused(image, "extra-file", rel, airborne_fingerprints=AIRBORNE)


def test_symlinks_and_fifos_in_an_image(image, tmp_path):
    os.mkfifo(image.root / "tiles/18/fifo")
    refused(image, "special-file", "tiles/18/fifo", airborne_fingerprints=AIRBORNE)
    (image.root / "tiles/18/fifo").unlink()
    (image.root / "tiles/19").symlink_to(tmp_path, target_is_directory=True)
    refused(image, "symlink", "tiles/19", airborne_fingerprints=AIRBORNE)


def test_a_tree_of_smuggled_files_in_an_image_is_not_entered(image, opened):
    for i in range(50):
        write(image.root, f"payload/{i}/{i}.bin")
    refused(image, "extra-file", "payload", airborne_fingerprints=AIRBORNE)
    assert not [p for p in opened if "/payload/" in p]


# ---------------------------------------------------------------- pending names on the ground

def test_a_pending_shard_of_a_listed_logical_is_accepted(cache):
    pending(cache.root, LOGICAL, npy([[1.0, 2.0], [3.0, 4.0]]))
    assert cache.verify().pending == 1


@pytest.mark.parametrize("logical", [
    "shards/net/0-0.npy",            # wrong depth (no zoom dir)
    "shards/net/18/x/0-0.npy",       # wrong depth (one too many)
    "shards/net/19/0-0.npy",         # another zoom dir
    "shards/other/18/0-0.npy",       # another model
    "shards/net/18/9-9.npy",         # a block the Manifest does not list
    "shards/net/18/0-0.faiss",       # another extension
    "shards/net/18/0-0.pyc",         # any lowercase extension
    "index/net.faiss",               # an index the Manifest does not list
    "tiles/18/1/1.npy",              # outside shards/ and index/
])
def test_a_pending_name_the_manifests_layout_cannot_produce(cache, logical, opened):
    rel = pending(cache.root, logical, npy([1.0]))
    refused(cache, "extra-file", rel)
    never_opened(opened, rel)


def test_two_pending_files_for_one_logical(cache, opened):
    first = pending(cache.root, LOGICAL, npy([1.0]))
    second = pending(cache.root, LOGICAL, npy([2.0]))
    refused(cache, "extra-file", min(first, second))
    never_opened(opened, first)
    never_opened(opened, second)


@pytest.mark.parametrize("data", [
    b"not a numpy file at all",
    npy([1.0, 2.0]) + b"appended payload",      # the header does not account for these bytes
    npy([1.0, 2.0])[:-1],                        # nor for a truncated body
    npy([{"pickle": "payload"}], dtype=object),  # Python objects: a pickle
])
def test_a_pending_shard_must_parse_as_npy(cache, data):
    rel = pending(cache.root, LOGICAL, data)  # the tag is right: only the format refuses it
    refused(cache, "extra-file", rel)


@pytest.mark.parametrize("attack", ["hardlink", "setuid", "fifo", "symlink"])
def test_a_pending_file_must_be_a_plain_regular_file(cache, attack, tmp_path):
    rel = pending(cache.root, LOGICAL, npy([1.0]))
    path = cache.root / rel
    if attack == "hardlink":
        os.link(path, tmp_path / "second-link")
    elif attack == "setuid":
        path.chmod(0o4644)
    elif attack == "fifo":
        path.unlink()
        os.mkfifo(path)
    else:
        (tmp_path / "target").write_bytes(path.read_bytes())
        path.unlink()
        path.symlink_to(tmp_path / "target")
    refused(cache, {"fifo": "special-file", "symlink": "symlink"}.get(attack, "extra-file"), rel)


def test_a_pending_file_larger_than_its_logicals_cap_is_never_hashed(cache, monkeypatch):
    listed = (cache.root / "shards/net/18/0-0.npy").stat().st_size
    cap = tree.PENDING_GROWTH * listed + tree.PENDING_SLACK
    values = np.zeros((cap // 4 + 1024,), dtype=np.float32)  # a valid .npy just over the cap
    rel = pending(cache.root, LOGICAL, npy(values))
    hashed = hashes(monkeypatch)
    refused(cache, "extra-file", rel)
    assert (cache.root / rel).stat().st_size not in hashed


def _index_cache(cache):
    """The hand-built cache with a listed FAISS index, as a real build names it."""
    data = b"IxFI" + b"\x00" * 60
    rel = pending(cache.root, "index/net.faiss", data)
    files = cache.entries() + [FileEntry(rel, len(data), blake3.blake3(data).hexdigest(),
                                         "index")]
    cache.sign(cache.manifest(files=files, engines=[ENGINE_ENTRY]))
    return cache


def test_a_pending_faiss_index_by_its_magic(cache):
    _index_cache(cache)
    pending(cache.root, "index/net.faiss", b"IHNf" + b"\x01" * 100)
    assert cache.verify().pending == 1


def test_a_pending_faiss_index_without_its_magic(cache):
    _index_cache(cache)
    rel = pending(cache.root, "index/net.faiss", b"\x7fELF" + b"\x01" * 100)
    refused(cache, "extra-file", rel)


# ---------------------------------------------------------------- engines on the ground

def engine_pair(root: Path, model: str, material: dict, engine: bytes | None = b"engine",
                **extra) -> tuple[str, str]:
    key = digest(material)
    stem = f"engines/{model}-{key}"
    sidecar = {"key": key, "model": model, "material": material, **extra}
    if engine is not None:
        sidecar.update(engine_size=len(engine), engine_blake3=blake3.blake3(engine).hexdigest())
        write(root, f"{stem}.onnx", engine)
    write(root, f"{stem}.json", json.dumps(sidecar).encode())
    return f"{stem}.json", f"{stem}.onnx"


def test_a_pending_engine_pair_of_a_listed_model(cache):
    engine_pair(cache.root, "net", {"onnx_hash": "ab" * 32})
    assert cache.verify().pending == 2


def test_a_made_up_engine_pair_of_an_unlisted_model(cache, opened):
    sidecar, engine = engine_pair(cache.root, "evil", {"onnx_hash": "ab" * 32})
    refused(cache, "extra-file", sidecar)  # it proves itself, but the Manifest has no such model
    never_opened(opened, sidecar)
    never_opened(opened, engine)


def test_two_pending_engine_keys_for_one_model(cache):
    engine_pair(cache.root, "net", {"onnx_hash": "ab" * 32})
    engine_pair(cache.root, "net", {"onnx_hash": "cd" * 32})
    refused(cache, "extra-file")


def test_an_engine_without_its_sidecar(cache):
    sidecar, engine = engine_pair(cache.root, "net", {"onnx_hash": "ab" * 32})
    (cache.root / sidecar).unlink()
    refused(cache, "extra-file", engine)


def test_an_engine_whose_size_is_not_its_sidecars_is_never_hashed(cache, monkeypatch):
    sidecar, engine = engine_pair(cache.root, "net", {"onnx_hash": "ab" * 32})
    with open(cache.root / engine, "ab") as fh:
        fh.write(b"more")
    hashed = hashes(monkeypatch)
    refused(cache, "extra-file", engine)
    assert (cache.root / engine).stat().st_size not in hashed


@pytest.mark.parametrize("text", [
    '{"key": "K", "key": "K", "material": {}}',   # duplicate keys: two readers may disagree
    '{"key": "K", "material": {"x": NaN}}',       # not JSON
    '{"key": "K", "material": ' + '[' * 40 + ']' * 40 + '}',  # deeper than any sidecar
    '["K"]',
])
def test_a_sidecar_that_is_not_strict_json(cache, text):
    key = digest({})
    rel = f"engines/net-{key}.json"
    write(cache.root, rel, text.replace("K", key).encode())
    refused(cache, "extra-file", rel)


def test_a_sidecar_naming_another_model(cache):
    sidecar, _ = engine_pair(cache.root, "net", {"onnx_hash": "ab" * 32}, engine=None)
    data = json.loads((cache.root / sidecar).read_bytes())
    (cache.root / sidecar).write_text(json.dumps({**data, "model": "evil"}))
    refused(cache, "extra-file", sidecar)


def test_a_300_mb_engine_named_json_is_refused_unread(cache, monkeypatch):
    """A sidecar is capped at 1 MiB before a byte is read: no 1.5 GB of parsing first."""
    rel = f"engines/net-{digest({'x': 1})}.json"
    path = cache.root / rel
    with open(path, "wb") as fh:  # real bytes, not a hole: a reader would have to hold them
        block = b'{"k": "' + b"a" * (1 << 20) + b'"}'
        fh.write(b"[")
        for _ in range(300):
            fh.write(block + b",")
        fh.write(b"0]")
    assert path.stat().st_size > 300 * 10**6
    reads = []
    real_pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: reads.append(n) or real_pread(fd, n, off))
    tracemalloc.start()
    start = time.perf_counter()
    try:
        refused(cache, "extra-file", rel)
    finally:
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert elapsed < 1.0 and peak < 20 << 20, (elapsed, peak)
    assert reads == []


# ---------------------------------------------------------------- many files, huge files

def refused_unopened(cache, opened, top, names, first: str, seen: str) -> None:
    """100k empty files `names` under `top`: refused as extra, naming `first`, in under 10 s, and
    none of them (paths holding `seen`) opened."""
    for name in names:
        os.close(os.open(top / name, os.O_WRONLY | os.O_CREAT, 0o644))
    opened.clear()
    start = time.perf_counter()
    refused(cache, "extra-file", first)
    assert time.perf_counter() - start < 10
    assert not [p for p in opened if seen in p]


def test_100k_empty_files_are_refused_by_name(cache, opened):
    top = cache.root / "tiles/18/9"
    top.mkdir(parents=True)
    refused_unopened(cache, opened, top, (f"{i}.jpg" for i in range(100_000)),
                     "tiles/18/9/0.jpg", "/tiles/18/9/")


def test_100k_pending_names_for_one_logical_are_refused_unopened(cache, opened):
    refused_unopened(cache, opened, cache.root / "shards/net/18",
                     (f"0-0.{i:016x}.npy" for i in range(100_000)),
                     "shards/net/18/0-0.0000000000000000.npy", "/shards/net/18/0-0.0")


@pytest.mark.parametrize("where", ["ground-unlisted-name", "ground-pending-name", "airborne"])
def test_a_sparse_100_gib_file_is_refused_in_under_a_second(cache, where, opened):
    if where == "airborne":
        flight_image(cache)
    rel = (tagged_relpath(LOGICAL, "0123456789abcdef" + "0" * 48) if where == "ground-pending-name"
           else "tiles/18/1/huge.jpg")
    sparse(cache.root / rel, 100 << 30)
    start = time.perf_counter()
    refused(cache, "extra-file", rel,
            **({"airborne_fingerprints": AIRBORNE} if where == "airborne" else {}))
    assert time.perf_counter() - start < 1.0
    if where != "ground-pending-name":
        never_opened(opened, rel)
    assert stat.S_ISREG(os.lstat(cache.root / rel).st_mode)
