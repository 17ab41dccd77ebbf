"""What `c10 verify` prints, from the attacker's side: a name from the cache never reaches the
terminal raw (no fake `c10 verify: OK` line), every failure is one verdict with its exit code and,
with --json, exactly one JSON line: a Manifest nested 100k deep, an exception inside the verifier,
no trusted keys. Then first use, the sector and the clock as the command reports them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta

import pytest
from test_freshness import area, sign
from test_verify import NOW, Cache

from c10.canonical import canonical_json
from c10.cli import main
from c10.trust.dsse import PAYLOAD_TYPE, sign_envelope
from c10.trust.keys import public_key_pem
from c10.trust.printable import printable
from c10.trust.verify import EXIT_CODES

FAKE = "x\n c10 verify: OK \x1b[1A\x1b[2K\rc10 verify: OK\x1b]0;title\x07"
DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.fixture
def cache(tmp_path):
    (tmp_path / "cache").mkdir()
    made = Cache(tmp_path / "cache", tmp_path / "keys")
    sign(made, area("kyiv-north"))
    (tmp_path / "op.pub").write_bytes(public_key_pem(made.key))
    return made


def argv(cache, *extra) -> list[str]:
    return ["verify", str(cache.root), "--trusted-keys", str(cache.root.parent / "op.pub"),
            "--state", str(cache.state), "--now", NOW.isoformat(), *extra]


def run(cache, capsys, *extra) -> tuple[int, str, str]:
    code = main(argv(cache, *extra))
    out = capsys.readouterr()
    return code, out.out, out.err


def run_json(cache, capsys, *extra) -> tuple[int, dict]:
    code, out, err = run(cache, capsys, "--json", *extra)
    assert out.count("\n") == 1 and out.endswith("\n"), out  # exactly one line
    assert "Traceback" not in err
    line = json.loads(out)
    assert line["exit_code"] == code == EXIT_CODES[line.get("reason", "ok")]
    return code, line


def run_process(cache, tmp_path, *extra, env=None) -> subprocess.CompletedProcess:
    """The command as the aircraft runs it, stdout and stderr as raw bytes."""
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONIOENCODING"}
    environ |= {"XDG_CONFIG_HOME": str(tmp_path / "cfg"), "XDG_STATE_HOME": str(tmp_path / "st")}
    environ |= env or {}
    return subprocess.run([sys.executable, "-m", "c10.cli", *argv(cache, *extra)],
                          capture_output=True, env=environ, timeout=120)


# ---------------------------------------------------------------- names from the cache

def _plant(cache, tmp_path, kind) -> tuple[str, str]:
    """A file name with a newline and escape sequences (and undecodable bytes) in the cache;
    (the reason verify gives, the name as Python sees it)."""
    parent = os.fsencode(cache.root / "tiles" / "18" / "1")
    if kind == "extra-file":
        name = os.fsencode(FAKE)
        with open(os.path.join(parent, name), "wb") as fh:
            fh.write(b"smuggled")
    elif kind == "undecodable":
        name = b"\xff\xfe" + os.fsencode(FAKE)
        with open(os.path.join(parent, name), "wb") as fh:
            fh.write(b"smuggled")
    else:
        name = os.fsencode(FAKE)
        os.symlink(b"1.jpg", os.path.join(parent, name))
    return ("symlink" if kind == "symlink" else "extra-file"), "tiles/18/1/" + os.fsdecode(name)


def _assert_safe(stream: bytes) -> None:
    assert b"\x1b" not in stream and b"\r" not in stream and b"\x07" not in stream
    assert b"\xff" not in stream
    assert not any(line.lstrip().startswith(b"c10 verify: OK") for line in stream.splitlines())


@pytest.mark.parametrize("kind", ["extra-file", "undecodable", "symlink"])
def test_a_file_name_never_reaches_the_terminal_raw(cache, tmp_path, kind):
    reason, rel = _plant(cache, tmp_path, kind)
    human = run_process(cache, tmp_path)
    assert human.returncode == EXIT_CODES[reason], human.stderr
    _assert_safe(human.stdout)
    _assert_safe(human.stderr)
    assert human.stdout.count(b"\n") == 1 and human.stderr == b""
    assert human.stdout.startswith(f"c10 verify: REJECTED ({reason}): ".encode())
    assert b"\\n c10 verify: OK \\x1b[1A" in human.stdout  # shown, escaped
    if kind == "undecodable":
        assert b"tiles/18/1/\\xff\\xfex\\n" in human.stdout  # the bytes, as bytes
    tool = run_process(cache, tmp_path, "--json")
    assert tool.returncode == EXIT_CODES[reason] and tool.stdout.count(b"\n") == 1
    _assert_safe(tool.stdout)
    assert tool.stdout.isascii()
    line = json.loads(tool.stdout)
    assert line["reason"] == reason and line["path"] == rel  # the exact name, for tools


def test_a_name_this_terminal_cannot_encode_is_escaped_not_a_crash(cache, tmp_path):
    name = "Київ\u202e".encode() + b"\xff"
    with open(os.path.join(os.fsencode(cache.root / "tiles"), name), "wb") as fh:
        fh.write(b"x")
    proc = run_process(cache, tmp_path, env={"PYTHONIOENCODING": "ascii"})
    assert proc.returncode == EXIT_CODES["extra-file"], proc.stderr
    assert proc.stderr == b"" and proc.stdout.isascii()
    assert b"tiles/\\u041a\\u0438\\u0457\\u0432\\u202e\\xff" in proc.stdout


def test_printable():
    assert printable("tiles/18/1/2.jpg") == "tiles/18/1/2.jpg"
    assert printable(FAKE) == ("x\\n c10 verify: OK \\x1b[1A\\x1b[2K\\rc10 verify: OK"
                               "\\x1b]0;title\\x07")
    assert printable(os.fsdecode(b"a\xffb\x7f")) == "a\\xffb\\x7f"
    assert printable("Київ\u2028\u0085") == "Київ\\u2028\\u0085"
    assert printable("Київ", "ascii") == "\\u041a\\u0438\\u0457\\u0432"
    assert printable("\U000e0001") == "\\U000e0001"  # a tag character: invisible


# ---------------------------------------------------------------- one verdict, whatever happens

def _deep_signed_manifest(cache):
    """A signer (or a bug) that signed a Manifest nested 100k deep."""
    envelope = sign_envelope(DEEP, PAYLOAD_TYPE, cache.key)
    (cache.root / "Manifest.json.dsse").write_bytes(canonical_json(envelope) + b"\n")
    (cache.root / "Manifest.json").write_bytes(DEEP)


def _deep_unsigned_manifest(cache):
    (cache.root / "Manifest.json").write_bytes(DEEP)


def _deep_envelope(cache):
    (cache.root / "Manifest.json").write_bytes(DEEP)  # big enough to allow a big envelope
    (cache.root / "Manifest.json.dsse").write_bytes(b'{"payload":' + DEEP + b"}")


@pytest.mark.parametrize("plant", [_deep_signed_manifest, _deep_unsigned_manifest,
                                   _deep_envelope])
def test_json_nested_100k_deep_is_one_json_line_with_a_reason(cache, capsys, plant):
    plant(cache)
    code, line = run_json(cache, capsys)
    assert line["ok"] is False and code != 0
    assert line["reason"] in ("bad-manifest", "envelope-mismatch", "bad-envelope", "internal")
    code, out, err = run(cache, capsys)
    assert out.startswith("c10 verify: REJECTED (") and out.count("\n") == 1 and err == ""


@pytest.mark.parametrize("exc", [RecursionError("maximum recursion depth exceeded"),
                                 MemoryError(), UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"),
                                 KeyError("files"), ZeroDivisionError("a bug")])
def test_any_exception_inside_verification_is_reason_internal(cache, capsys, monkeypatch, exc):
    def broken(*args, **kwargs):
        raise exc

    monkeypatch.setattr("c10.trust.verify.check_files", broken)
    code, line = run_json(cache, capsys)
    assert line["reason"] == "internal" and code == EXIT_CODES["internal"] == 99
    assert type(exc).__name__ in line["message"]
    code, out, err = run(cache, capsys)
    assert code == 99 and out.startswith("c10 verify: REJECTED (internal): ") and err == ""
    assert out.count("\n") == 1


def test_an_exception_outside_verify_cache_is_still_one_verdict(cache, capsys, monkeypatch):
    def broken(entries):
        raise RecursionError("deep")

    monkeypatch.setattr("c10.trust.keys.load_trusted_keys", broken)
    code, line = run_json(cache, capsys)
    assert line["reason"] == "internal" and code == 99


def test_no_trusted_keys_is_exit_13(cache, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    no_keys = ["verify", str(cache.root), "--state", str(cache.state), "--json"]
    assert main(no_keys) == EXIT_CODES["no-trusted-keys"] == 13  # no trust store at all
    line = json.loads(capsys.readouterr().out)
    assert line["reason"] == "no-trusted-keys" and str(tmp_path / "config") in line["message"]
    (tmp_path / "config" / "c10" / "trusted").mkdir(parents=True)
    assert main(no_keys[:-1]) == 13  # an empty one
    assert capsys.readouterr().out.startswith("c10 verify: REJECTED (no-trusted-keys): ")
    assert not cache.state.exists()


def test_a_trusted_key_that_is_not_a_key(cache, capsys, tmp_path):
    (tmp_path / "op.pub").write_bytes(b"not a key\n")
    code, line = run_json(cache, capsys)
    assert line["reason"] == "bad-trusted-key" and code == 17


def test_a_bad_now_is_a_usage_error(cache, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv(cache, "--now", "yesterday"))
    assert info.value.code == 2


# ---------------------------------------------------------------- what the verdict says

def test_first_use_is_said_once(cache, capsys):
    code, line = run_json(cache, capsys)
    assert code == 0 and line["first_use"] is True and line["area"] == "kyiv-north"
    code, line = run_json(cache, capsys)
    assert code == 0 and line["first_use"] is False
    (cache.state).unlink()
    code, out, _ = run(cache, capsys)
    assert out.startswith(f"c10 verify: OK {cache.root}: area kyiv-north, ")
    assert out.count("\n") == 1 and "; first use: " in out
    code, out, _ = run(cache, capsys)
    assert code == 0 and "first use" not in out


def test_area_clock_and_future_through_the_command(cache, capsys):
    assert run_json(cache, capsys, "--area", "kyiv-south")[0] == EXIT_CODES["wrong-area"] == 71
    assert run_json(cache, capsys, "--area", "kyiv-north")[0] == 0
    earlier = (NOW - timedelta(hours=1)).isoformat()
    code, line = run_json(cache, capsys, "--now", earlier)
    assert line["reason"] == "clock-went-back" and code == 33
    sign(cache, area("kyiv-north"), version=2, issued_at=NOW + timedelta(hours=2),
         expires=NOW + timedelta(days=7))
    code, line = run_json(cache, capsys)
    assert line["reason"] == "not-yet-valid" and code == 41


def test_first_use_and_area_on_a_real_built_cache(tmp_path, capsys, operator_key, inputs):
    from conftest import make_cache

    from c10.rules.driver import run_build

    root = make_cache(tmp_path / "built", inputs, operator_key)
    assert run_build(root) == 0
    capsys.readouterr()
    base = ["verify", str(root), "--json", "--state", str(tmp_path / "state.json"),
            "--trusted-keys", str(operator_key[1])]
    lines = []
    for extra in ([], [], ["--area", "not-this-sector"]):
        code = main(base + extra)
        out = capsys.readouterr().out
        assert out.count("\n") == 1
        lines.append((code, json.loads(out)))
    (first_code, first), (second_code, second), (wrong_code, wrong) = lines
    assert first_code == 0 and first["first_use"] is True
    assert second_code == 0 and second["first_use"] is False
    assert wrong_code == EXIT_CODES["wrong-area"] and wrong["reason"] == "wrong-area"
