"""The c10 command on a real built cache: verify (exit codes, --json, airborne), keygen, init."""
from __future__ import annotations

import json
import os

import pytest

from c10.cli import main
from c10.rules.driver import run_build
from c10.trust.verify import EXIT_CODES


@pytest.fixture
def built(cache, capsys):
    assert run_build(cache) == 0
    capsys.readouterr()
    return cache


def verify(root, capsys, tmp_path, *extra, trust=None):
    keys = ["--trusted-keys", str(trust)] if trust else []
    code = main(["verify", str(root), "--json", "--state", str(tmp_path / "state.json"), *keys,
                 *extra])
    return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_verify_trusts_only_keys_outside_the_cache(built, capsys, tmp_path, monkeypatch,
                                                   operator_key):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    assert main(["verify", str(built)]) == EXIT_CODES["no-trusted-keys"] == 13
    assert "REJECTED (no-trusted-keys): no trusted keys" in capsys.readouterr().out
    store = tmp_path / "config" / "c10" / "trusted"
    store.mkdir(parents=True)
    (store / "operator.pub").write_bytes(operator_key[1].read_bytes())
    code, out = verify(built, capsys, tmp_path)
    assert code == 0 and out["ok"] and out["version"] == 1 and out["files"] > 40


def test_verify_airborne_on_the_build_host(built, capsys, tmp_path, operator_key):
    """--airborne is strict: the build workspace (c10.toml, .c10/...) is refused, its flight image
    (`c10 pack`) verifies."""
    code, out = verify(built, capsys, tmp_path, "--airborne", trust=operator_key[1])
    assert out["reason"] == "extra-file" and code == EXIT_CODES["extra-file"]
    image = tmp_path / "image"
    assert main(["pack", str(built), str(image), "--trusted-keys", str(operator_key[1]),
                 "--state", str(tmp_path / "state.json")]) == 0
    capsys.readouterr()
    assert verify(image, capsys, tmp_path, "--airborne", trust=operator_key[1])[0] == 0


def test_verify_rejects_a_flipped_byte_with_its_exit_code(built, capsys, tmp_path, operator_key):
    shard = next((built / "shards").rglob("*.npy"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    code, out = verify(built, capsys, tmp_path, trust=operator_key[1])
    assert out["reason"] == "hash-mismatch" and code == EXIT_CODES["hash-mismatch"] != 0
    assert out["path"] == shard.relative_to(built).as_posix()


def test_verify_rejects_expired(built, capsys, tmp_path, operator_key):
    code, out = verify(built, capsys, tmp_path, "--now", "2099-01-01T00:00:00+00:00",
                       trust=operator_key[1])
    assert out["reason"] == "expired" and code == EXIT_CODES["expired"]


def test_verify_with_an_unknown_key(built, capsys, tmp_path):
    main(["keygen", str(tmp_path / "other.pem")])
    capsys.readouterr()
    code, out = verify(built, capsys, tmp_path, trust=tmp_path / "other.pem.pub")
    assert code != 0 and out["reason"] in ("unknown-key", "bad-signature")


def test_keygen_mode_and_refusal(tmp_path, capsys):
    key = tmp_path / "op.pem"
    assert main(["keygen", str(key)]) == 0
    assert os.stat(key).st_mode & 0o777 == 0o600 and "SHA256:" in capsys.readouterr().out
    assert main(["keygen", str(key)]) != 0
    assert "refusing to overwrite" in capsys.readouterr().err


def test_keygen_prints_absolute_paths(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keys").mkdir()
    assert main(["keygen", "keys/op.pem"]) == 0
    out = capsys.readouterr().out
    key = tmp_path.resolve() / "keys" / "op.pem"
    assert f"wrote {key} (private" in out and f"{key}.pub (public)" in out
    # the line to paste: c10.toml resolves a relative signing.key against the cache
    assert f'`key = "{key}"`' in out and " keys/op.pem" not in out


def test_init_creates_a_missing_directory_but_never_replaces_a_file(tmp_path, capsys):
    target = tmp_path / "new" / "sector-7"
    assert main(["init", str(target)]) == 0  # mkdir -p: init is where a cache is placed
    assert "created" in capsys.readouterr().out and (target / "c10.toml").is_file()
    (tmp_path / "file").write_text("mine")
    assert main(["init", str(tmp_path / "file")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "mine"
