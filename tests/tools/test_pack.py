"""`c10 pack DIR OUT` on a real built cache: the image holds exactly the signed files and verifies
--airborne; OUT is never overwritten; a tampered or killed pack leaves no OUT, and the next pack
works."""
from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from listing import listed_files

from c10.cli import main
from c10.errors import VerifyError
from c10.store.layout import ENVELOPE_NAME, MANIFEST_NAME
from c10.tools import pack as packing
from c10.trust.keys import load_trusted_keys
from c10.trust.verify import EXIT_CODES, verify_cache


@pytest.fixture
def built(cache, capsys):
    from c10.rules.driver import run_build

    assert run_build(cache) == 0
    capsys.readouterr()
    return cache


def pack_cli(built, out, operator_key, tmp_path, *extra) -> int:
    return main(["pack", str(built), str(out), "--trusted-keys", str(operator_key[1]),
                 "--state", str(tmp_path / "state.json"), *extra])


def verify_airborne(image, operator_key, tmp_path, capsys) -> dict:
    capsys.readouterr()
    code = main(["verify", str(image), "--airborne", "--json", "--trusted-keys",
                 str(operator_key[1]), "--state", str(tmp_path / "aircraft-state.json")])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == out["exit_code"]
    return out


def tree_of(root: Path) -> dict[str, str]:
    """relpath -> 'dir' or 'file' of everything under root (no symlink followed)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(dirpath) / name
            out[path.relative_to(root).as_posix()] = "dir" if path.is_dir() else "file"
    return out


def listed(root: Path) -> list[str]:
    return [f["path"] for f in listed_files(root)]


def partials(out: Path) -> list[Path]:
    return sorted(out.parent.glob(packing.partial_prefix(out) + "*"))


def api_pack(built, out, operator_key, **kw):
    return packing.pack(built, out, trusted=load_trusted_keys([operator_key[1]]),
                        now=dt.datetime.now(dt.timezone.utc), **kw)


# ---------------------------------------------------------------- the image

def test_pack_then_verify_airborne_holds_exactly_the_listed_files(built, operator_key, tmp_path,
                                                                 capsys):
    # what the workspace holds beside the listed files never reaches the image
    (built / "__pycache__").mkdir()
    (built / "__pycache__" / "dodo.cpython-311.pyc").write_bytes(b"pyc")
    (built / "tiles" / "99").mkdir()  # an empty dir
    (built / "notes.txt").write_bytes(b"operator notes")
    image = tmp_path / "image"
    assert pack_cli(built, image, operator_key, tmp_path) == 0
    said = capsys.readouterr().out
    assert f"wrote {image}" in said and f"`c10 verify {image} --airborne`" in said
    out = verify_airborne(image, operator_key, tmp_path, capsys)
    assert out["ok"] and out["pending"] == 0 and out["files"] == len(listed(built))
    files = listed(built)
    dirs = {p.rpartition("/")[0] for p in files}
    dirs |= {d.rsplit("/", k)[0] for d in dirs for k in range(d.count("/") + 1)}
    want = {**{rel: "file" for rel in files + [MANIFEST_NAME, ENVELOPE_NAME]},
            **{d: "dir" for d in dirs if d}}
    assert tree_of(image) == want  # no c10.toml, dodo.py, doit.cfg, .c10/, bytecode, empty dir
    for rel in [MANIFEST_NAME, ENVELOPE_NAME, *files]:
        assert (image / rel).read_bytes() == (built / rel).read_bytes()
        assert stat.S_IMODE(os.lstat(image / rel).st_mode) == 0o644
    for rel in ["", *dirs]:
        assert stat.S_IMODE(os.lstat(image / rel).st_mode) == 0o755
    assert partials(image) == []


def test_pack_leaves_pending_files_of_a_stopped_build_behind(built, operator_key, tmp_path):
    """A pending shard verifies on the ground, but it is not the Manifest's: not in the image."""
    import io

    import blake3
    import numpy as np

    from c10.store.layout import split_tagged, tagged_relpath

    shard = next(p for p in listed(built) if p.startswith("shards/"))
    rows = np.load(built / shard, allow_pickle=False)
    buf = io.BytesIO()
    np.save(buf, rows[:1])  # the next version of that block's shard, killed before the commit
    other = tagged_relpath(split_tagged(shard)[0], blake3.blake3(buf.getvalue()).hexdigest())
    (built / other).write_bytes(buf.getvalue())
    result = verify_cache(built, trusted=load_trusted_keys([operator_key[1]]),
                          now=dt.datetime.now(dt.timezone.utc), state_path=None)
    assert result.pending == 1
    result = api_pack(built, tmp_path / "image", operator_key)
    assert not (tmp_path / "image" / other).exists() and result.files == len(listed(built))


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("kind", ["dir", "file", "symlink", "empty-dir"])
def test_an_existing_out_is_refused_and_left_as_it_is(built, operator_key, tmp_path, capsys,
                                                      kind):
    out = tmp_path / "image"
    if kind == "dir":
        out.mkdir()
        (out / "mine.txt").write_bytes(b"the user's")
    elif kind == "empty-dir":
        out.mkdir()
    elif kind == "file":
        out.write_bytes(b"the user's")
    else:
        out.symlink_to(tmp_path / "nowhere")
    before = tree_of(tmp_path)
    assert pack_cli(built, out, operator_key, tmp_path) == packing.PackError.exit_code != 0
    err = capsys.readouterr().err
    assert str(out) in err and "already exists" in err
    assert tree_of(tmp_path) == before
    if kind == "dir":
        assert (out / "mine.txt").read_bytes() == b"the user's"


def test_out_appearing_while_pack_runs_is_not_replaced(built, operator_key, tmp_path,
                                                       monkeypatch):
    """The rename never replaces anything (renameat2 RENAME_NOREPLACE: not even an empty dir)."""
    out = tmp_path / "image"
    real = packing.verify_cache

    def then_the_user_makes_out(*args, **kw):
        result = real(*args, **kw)
        out.mkdir()
        return result

    monkeypatch.setattr(packing, "verify_cache", then_the_user_makes_out)
    with pytest.raises(packing.PackError, match="appeared"):
        api_pack(built, out, operator_key)
    assert out.is_dir() and list(out.iterdir()) == [] and partials(out) == []


@pytest.mark.parametrize("attack", ["flipped-byte", "truncated", "symlink", "hardlink"])
def test_a_tampered_listed_file_is_refused_and_no_out(built, operator_key, tmp_path, capsys,
                                                      attack):
    rel = next(p for p in listed(built) if p.startswith("tiles/"))
    path = built / rel
    data = path.read_bytes()
    if attack == "flipped-byte":
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    elif attack == "truncated":
        path.write_bytes(data[:-1])
    elif attack == "symlink":
        (tmp_path / "elsewhere.jpg").write_bytes(data)
        path.unlink()
        path.symlink_to(tmp_path / "elsewhere.jpg")
    else:
        os.link(path, tmp_path / "second-link")
    reason = {"flipped-byte": "hash-mismatch", "truncated": "size-mismatch"}.get(attack, attack)
    out = tmp_path / "image"
    assert pack_cli(built, out, operator_key, tmp_path) == EXIT_CODES[reason]
    err = capsys.readouterr().err
    assert f"REFUSED ({reason})" in err and rel in err
    assert not os.path.lexists(out) and partials(out) == []


def test_a_file_changed_while_it_is_copied_aborts(built, operator_key, tmp_path, monkeypatch):
    """Size and blake3 are checked on the bytes read while copying, not on an earlier look."""
    rel = next(p for p in listed(built) if p.startswith("tiles/"))
    real = packing._copy_fd

    def tampered(fd, name, size, target):
        if name == rel:
            (built / rel).write_bytes(b"\xff" * size)  # same inode, same size, other bytes
        return real(fd, name, size, target)

    monkeypatch.setattr(packing, "_copy_fd", tampered)
    with pytest.raises(VerifyError) as info:
        api_pack(built, tmp_path / "image", operator_key)
    assert (info.value.reason, info.value.path) == ("hash-mismatch", rel)
    assert not (tmp_path / "image").exists() and partials(tmp_path / "image") == []


@pytest.mark.parametrize("what", ["unknown-key", "expired", "envelope-mismatch"])
def test_pack_verifies_the_manifest_first(built, operator_key, tmp_path, capsys, what):
    out = tmp_path / "image"
    extra = []
    if what == "unknown-key":
        main(["keygen", str(tmp_path / "other.pem")])
        capsys.readouterr()
        code = main(["pack", str(built), str(out), "--trusted-keys",
                     str(tmp_path / "other.pem.pub"), "--state", str(tmp_path / "s.json")])
    else:
        if what == "expired":
            extra = ["--now", "2099-01-01T00:00:00+00:00"]
        else:
            path = built / MANIFEST_NAME
            path.write_bytes(path.read_bytes().replace(b'"version":1', b'"version":9'))
        code = pack_cli(built, out, operator_key, tmp_path, *extra)
    assert code == EXIT_CODES[what]
    assert f"REFUSED ({what})" in capsys.readouterr().err
    assert not os.path.lexists(out) and partials(out) == []


def test_pack_refuses_an_out_inside_the_cache(built, operator_key, tmp_path, capsys):
    assert pack_cli(built, built / "image", operator_key, tmp_path) != 0
    assert "inside the cache" in capsys.readouterr().err
    assert not (built / "image").exists()


def test_pack_refuses_an_out_whose_directory_is_missing(built, operator_key, tmp_path, capsys):
    assert pack_cli(built, tmp_path / "no" / "image", operator_key, tmp_path) != 0
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


# ---------------------------------------------------------------- killed packs

def test_a_pack_failing_mid_copy_leaves_no_out_and_the_next_pack_works(built, operator_key,
                                                                       tmp_path, monkeypatch):
    out, real, calls, lock = tmp_path / "image", packing._copy_one, [], threading.Lock()

    def dies_mid_copy(src, dst, entry):
        with lock:
            calls.append(entry["path"])
            if len(calls) == 10:
                raise RuntimeError("killed mid-copy")
        return real(src, dst, entry)

    monkeypatch.setattr(packing, "_copy_one", dies_mid_copy)
    with pytest.raises(RuntimeError, match="killed mid-copy"):
        api_pack(built, out, operator_key)
    assert not os.path.lexists(out) and partials(out) == []
    monkeypatch.setattr(packing, "_copy_one", real)
    result = api_pack(built, out, operator_key)
    assert result.files == len(listed(built))
    verify_cache(out, trusted=load_trusted_keys([operator_key[1]]),
                 now=dt.datetime.now(dt.timezone.utc), state_path=None, strict=True)


SLOW_PACK = """\
import sys, time
import c10.tools.pack as p
real = p._copy_one
def slow(src, dst, entry):
    time.sleep(0.05)
    return real(src, dst, entry)
p._copy_one = slow
from c10.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_sigkilled_pack_leaves_no_out_and_the_next_pack_removes_its_leftover(
        built, operator_key, tmp_path, capsys):
    out = tmp_path / "image"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_PACK, "pack", str(built), str(out),
                             "--trusted-keys", str(operator_key[1]), "--state",
                             str(tmp_path / "state.json")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not any(p.is_file() for d in partials(out) for p in (d / "tiles").rglob("*")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.lexists(out)
    leftover = partials(out)
    assert len(leftover) == 1 and leftover[0].name.startswith(f".image{packing.PARTIAL}")
    assert pack_cli(built, out, operator_key, tmp_path) == 0
    said = capsys.readouterr().out
    assert f"removed {leftover[0]}" in said and partials(out) == []
    assert verify_airborne(out, operator_key, tmp_path, capsys)["ok"]


def test_a_running_packs_temporary_dir_is_not_taken_for_a_leftover(built, operator_key,
                                                                   tmp_path):
    out = tmp_path / "image"
    running = out.parent / f"{packing.partial_prefix(out)}running"
    running.mkdir()
    fd = os.open(running, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a pack holds it while it runs
        result = api_pack(built, out, operator_key)
        assert result.removed == () and running.is_dir()
    finally:
        os.close(fd)
    assert api_pack(built, tmp_path / "elsewhere", operator_key).removed == ()
    assert running.is_dir()  # a leftover of another OUT is not this pack's business
