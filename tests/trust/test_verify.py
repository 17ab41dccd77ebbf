"""`c10 verify`: a hand-built signed cache, then one test per attack with its named reason."""
from __future__ import annotations

import base64
import json
import os
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import blake3
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from c10.canonical import digest
from c10.errors import VerifyError
from c10.store.digest import MMAP_MIN
from c10.store.digest import blake3_file as hash_file
from c10.store.layout import tagged_relpath
from c10.trust import manifest as mf
from c10.trust.dsse import PAYLOAD_TYPE, sign_envelope
from c10.trust.keys import generate_key, keyid, load_signing_key
from c10.trust.manifest import FileEntry
from c10.trust.verify import EXIT_CODES, VerifyResult, verify_cache, verify_to_json

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
NOW = T0 + timedelta(hours=1)
CONTENT = {
    "tiles/18/1/1.jpg": b"\xff\xd8tile-one" * 50,
    "tiles/18/1/2.jpg": b"\xff\xd8tile-two" * 50,
    "tiles/18/2/1.png": b"\x89PNGtile-three" * 40,
    "engines/net-abc123.onnx": bytes(range(256)) * (MMAP_MIN // 256 + 7),  # mmap path
    "engines/net-abc123.json": b'{"backend":"onnxruntime"}',
    "shards/net/18/0-0.npy": b"\x93NUMPY" + b"\x00" * 500,
}
KINDS = {"tiles": "tile", "engines": "engine", "shards": "shard"}


class Cache:
    """A cache dir built by hand and signed through c10's own functions."""

    def __init__(self, root: Path, keydir: Path, content=CONTENT, version=1, key=None):
        self.root, self.version = root, version
        for rel, data in content.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        for rel in ("dodo.py", "c10.toml", ".c10.lock", ".c10/doit.sqlite"):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(b"# control\n")
        if key is None:
            keydir.mkdir(exist_ok=True)
            generate_key(keydir / "op.pem")
            key = load_signing_key(keydir / "op.pem", passphrase=None, cache_root=root)
        self.key = key
        self.trusted = {keyid(key): key.public_key()}
        self.state = keydir / "state" / "trusted.json"
        self.sign()

    def entries(self):
        out = []
        for rel in sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*")):
            kind = KINDS.get(rel.split("/")[0])
            if kind and (self.root / rel).is_file():
                full = self.root / rel
                out.append(FileEntry(rel, full.stat().st_size, hash_file(full), kind))
        return out

    def manifest(self, **over):
        files = self.entries()
        args = dict(version=self.version, issued_at=T0, expires=T0 + timedelta(days=7),
                    build_identity="build-A", request={"zooms": [18]}, host={"os": "Linux"},
                    tools={"c10": "0.1.0"}, tiles_hash=mf.tiles_aggregate_hash(files),
                    files=files, cache_id="sector-7",
                    engines=[{"path": "engines/net-abc123.onnx", "backend": "onnxruntime",
                              "fingerprint": "ort-1.31-x86_64"}], schema=2)  # flat: tiles listed
        args.update(over)
        return mf.build_manifest(**args)

    def sign(self, body: dict | None = None):
        self.write(mf.dumps_manifest(body or self.manifest()))

    def write(self, data: bytes):
        mf.write_signed_manifest(self.root, data, self.key)

    def verify(self, **kw):
        args = dict(trusted=self.trusted, now=NOW, state_path=self.state)
        args.update(kw)
        return verify_cache(self.root, **args)

    def reason(self, **kw) -> str:
        with pytest.raises(VerifyError) as info:
            self.verify(**kw)
        assert info.value.exit_code == EXIT_CODES[info.value.reason]
        return info.value.reason


@pytest.fixture
def cache(tmp_path):
    (tmp_path / "cache").mkdir()
    return Cache(tmp_path / "cache", tmp_path / "keys")


# ---------------------------------------------------------------- accepted

def test_good_cache_verifies_and_records_state(cache):
    result = cache.verify()
    assert isinstance(result, VerifyResult)
    assert (result.version, result.files, result.cache_id) == (1, len(CONTENT), "sector-7")
    assert result.bytes == sum(len(v) for v in CONTENT.values())
    assert result.keyid == keyid(cache.key) and result.state_updated
    assert json.loads(cache.state.read_bytes())["caches"]["sector-7"]["version"] == 1
    assert cache.verify().state_updated is False  # same bytes again: fine, no rewrite
    out = verify_to_json(result)
    assert out["ok"] is True and out["exit_code"] == 0 and json.dumps(out)


def test_control_files_are_allowed(cache):
    """Only names c10 writes into .c10/ (a made-up one such as .c10/logs/build.log is an extra
    file: tests/trust/test_tree.py)."""
    (cache.root / "doit.cfg").write_bytes(b"[GLOBAL]\nloader = c10\n")
    for rel in ("report.json", "hashes.json", "refs/shards/net/18/0-0.npy.json",
                "tmp/.Manifest.json.abcd1234.tmp"):
        (cache.root / ".c10" / rel).parent.mkdir(parents=True, exist_ok=True)
        (cache.root / ".c10" / rel).write_bytes(b"{}")
    cache.verify()


def test_bytecode_beside_dodo_is_an_extra_file(cache):
    """c10 never imports a file from the cache (doit.cfg names its loader), so no build writes
    __pycache__/: a planted one is smuggled bytes like any other."""
    pyc = cache.root / "__pycache__" / "dodo.cpython-311.pyc"
    pyc.parent.mkdir()
    pyc.write_bytes(b"pyc")
    assert cache.reason() == "extra-file"


def test_newer_version_is_accepted(cache):
    cache.verify()
    cache.version = 2
    cache.sign()
    assert cache.verify().version == 2


def test_no_state_path_skips_rollback(cache):
    assert cache.verify(state_path=None).state_updated is False


def flight_image(cache):
    """The cache as `c10 pack` leaves it: the listed files and the Manifest pair, nothing else."""
    for rel in ("dodo.py", "c10.toml", ".c10.lock"):
        (cache.root / rel).unlink()
    shutil.rmtree(cache.root / ".c10")
    for path in [cache.root, *cache.root.rglob("*")]:  # as pack writes them, whatever the umask
        path.chmod(0o755 if path.is_dir() else 0o644)
    return cache


def test_airborne_mode_matching_platform(cache):
    """--airborne is strict: the control files of a build workspace are extra files there."""
    assert cache.reason(airborne_fingerprints={"onnxruntime": "ort-1.31-x86_64"}) == "extra-file"
    flight_image(cache).verify(airborne_fingerprints={"onnxruntime": "ort-1.31-x86_64"})


def test_exit_codes_are_distinct():
    assert EXIT_CODES["ok"] == 0
    assert len(set(EXIT_CODES.values())) == len(EXIT_CODES)
    assert all(0 <= c < 126 for c in EXIT_CODES.values())


# ---------------------------------------------------------------- file attacks

def test_flipped_byte(cache):
    path = cache.root / "tiles/18/1/2.jpg"
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    assert cache.reason() == "hash-mismatch"


def test_flipped_byte_in_big_mmapped_file(cache):
    path = cache.root / "engines/net-abc123.onnx"
    with open(path, "r+b") as fh:
        fh.seek(MMAP_MIN + 3)
        byte = fh.read(1)
        fh.seek(MMAP_MIN + 3)
        fh.write(bytes([byte[0] ^ 0x80]))
    assert cache.reason() == "hash-mismatch"


def test_truncated_file(cache):
    path = cache.root / "shards/net/18/0-0.npy"
    path.write_bytes(path.read_bytes()[:-1])
    assert cache.reason() == "size-mismatch"


def test_extended_file(cache):
    with open(cache.root / "tiles/18/1/1.jpg", "ab") as fh:
        fh.write(b"\x00")
    assert cache.reason() == "size-mismatch"


@pytest.mark.parametrize("rel", ["evil.jpg", "tiles/18/1/3.jpg", ".hidden", "tiles/.x",
                                 "__pycache__/evil.cpython-311.pyc", ".c10",
                                 ".Manifest.json.abc.tmp"])
def test_extra_file(cache, rel):
    (cache.root / rel).parent.mkdir(parents=True, exist_ok=True)
    if rel == ".c10":
        shutil.rmtree(cache.root / ".c10")
    (cache.root / rel).write_bytes(b"smuggled")
    assert cache.reason() == "extra-file"


# ---------------------------------------------------------------- pending files of a stopped build

def hash_file_bytes(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def _npy(values) -> bytes:
    import io

    import numpy as np

    out = io.BytesIO()
    np.save(out, np.asarray(values, dtype=np.float32))
    return out.getvalue()


def _pending_shard(cache, data=None):
    """A next shard of a logical path the Manifest lists, as a real .npy (a pending file must parse
    as its format)."""
    data = _npy([1.0, 2.0, 3.0]) if data is None else data
    rel = tagged_relpath("shards/net/18/0-0.npy", hash_file_bytes(data))
    (cache.root / rel).write_bytes(data)
    return rel


def test_a_stopped_builds_content_named_files_are_pending_not_extra(cache):
    _pending_shard(cache)
    assert cache.verify().pending == 1


@pytest.mark.parametrize("attack", ["wrong-tag", "outside-shards", "symlink", "hardlink"])
def test_a_pending_name_proves_nothing_by_itself(cache, attack, tmp_path):
    rel = _pending_shard(cache)
    full = cache.root / rel
    if attack == "wrong-tag":
        full.write_bytes(b"other bytes under that name")
    elif attack == "outside-shards":
        full.rename(cache.root / "tiles/18/1" / Path(rel).name)
    elif attack == "symlink":
        (tmp_path / "target").write_bytes(full.read_bytes())
        full.unlink()
        full.symlink_to(tmp_path / "target")
    else:
        os.link(full, tmp_path / "second-link")
    assert cache.reason() == {"symlink": "symlink"}.get(attack, "extra-file")


def _engine_pair(material: dict) -> tuple[str, dict]:
    key = digest(material)
    return f"engines/net-{key}", {"key": key, "material": material}


def _sign_engine_model(cache):
    """Engine entries name their model (a pending engine must be of a model the Manifest has)."""
    cache.sign(cache.manifest(engines=[{"path": "engines/net-abc123.onnx", "model": "net",
                                        "backend": "onnxruntime",
                                        "fingerprint": "ort-1.31-x86_64"}]))


def test_a_new_engine_and_its_sidecar_are_pending_when_they_prove_each_other(cache):
    _sign_engine_model(cache)
    stem, sidecar = _engine_pair({"onnx_hash": "ab" * 32, "backend": "onnxruntime"})
    engine = b"compiled engine bytes"
    (cache.root / f"{stem}.json").write_text(json.dumps(
        {**sidecar, "engine_size": len(engine), "engine_blake3": hash_file_bytes(engine)}))
    assert cache.verify().pending == 1  # a kill between the sidecar and the engine's rename
    (cache.root / f"{stem}.onnx").write_bytes(engine)
    assert cache.verify().pending == 2
    (cache.root / f"{stem}.onnx").write_bytes(b"another engine")
    assert cache.reason() == "extra-file"


def test_an_engine_sidecar_must_hash_to_its_name(cache):
    _sign_engine_model(cache)
    stem, sidecar = _engine_pair({"onnx_hash": "ab" * 32})
    sidecar["material"]["onnx_hash"] = "cd" * 32
    (cache.root / f"{stem}.json").write_text(json.dumps(sidecar))
    assert cache.reason() == "extra-file"


def test_missing_file(cache):
    (cache.root / "tiles/18/2/1.png").unlink()
    assert cache.reason() == "missing-file"


def test_listed_file_replaced_by_symlink(cache, tmp_path):
    path = cache.root / "tiles/18/1/1.jpg"
    shutil.copy(path, tmp_path / "copy.jpg")
    path.unlink()
    path.symlink_to(tmp_path / "copy.jpg")
    assert cache.reason() == "symlink"


def test_extra_symlink(cache):
    (cache.root / "link.jpg").symlink_to(cache.root / "tiles/18/1/1.jpg")
    assert cache.reason() == "symlink"


def test_dangling_symlink_to_control_name(cache):
    (cache.root / "dodo.py").unlink()
    (cache.root / "dodo.py").symlink_to("/nonexistent")
    assert cache.reason() == "symlink"


def test_symlinked_directory(cache, tmp_path):
    """tiles/18/1 moved away and linked back: same bytes, but the cache no longer owns them."""
    shutil.move(cache.root / "tiles/18/1", tmp_path / "elsewhere")
    (cache.root / "tiles/18/1").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert cache.reason() == "symlink"


def test_extra_symlinked_directory(cache, tmp_path):
    (tmp_path / "outside").mkdir()
    (cache.root / "tiles/19").symlink_to(tmp_path / "outside", target_is_directory=True)
    assert cache.reason() == "symlink"


def test_symlinked_control_dir(cache, tmp_path):
    shutil.move(cache.root / ".c10", tmp_path / "private")
    (cache.root / ".c10").symlink_to(tmp_path / "private", target_is_directory=True)
    assert cache.reason() == "symlink"


def test_hardlink(cache, tmp_path):
    os.link(cache.root / "engines/net-abc123.json", tmp_path / "outside-link")
    assert cache.reason() == "hardlink"


def test_extra_fifo(cache):
    os.mkfifo(cache.root / "tiles/18/pipe")
    assert cache.reason() == "special-file"


def test_listed_file_replaced_by_fifo(cache):
    (cache.root / "tiles/18/1/1.jpg").unlink()
    os.mkfifo(cache.root / "tiles/18/1/1.jpg")
    assert cache.reason() == "special-file"


def test_dotdot_path(cache, tmp_path):
    (tmp_path / "secret").write_bytes(b"x")
    body = cache.manifest()
    body["files"].append({"path": "../secret", "size": 1, "blake3": hash_file(tmp_path / "secret"),
                          "kind": "tile"})
    cache.write(mf.dumps_manifest(body))  # a compromised signer: build_manifest would refuse
    assert cache.reason() == "bad-path"


@pytest.mark.parametrize("rel", ["/etc/hostname", "tiles/./18/1/1.jpg", "c10.toml", ""])
def test_unsafe_listed_paths(cache, rel):
    body = cache.manifest()
    body["files"].append({"path": rel, "size": 1, "blake3": "00" * 32, "kind": "tile"})
    cache.write(mf.dumps_manifest(body))
    assert cache.reason() == "bad-path"


# ---------------------------------------------------------------- freshness attacks

def test_rollback_to_older_version(cache, tmp_path):
    old = ((cache.root / "Manifest.json").read_bytes(),
           (cache.root / "Manifest.json.dsse").read_bytes())
    cache.version = 2
    cache.sign()
    cache.verify()
    (cache.root / "Manifest.json").write_bytes(old[0])
    (cache.root / "Manifest.json.dsse").write_bytes(old[1])
    assert cache.reason() == "rollback"


def test_same_version_other_bytes(cache):
    cache.verify()
    cache.sign(cache.manifest(build_identity="build-A-prime"))
    assert cache.reason() == "version-reuse"


def test_rollback_state_untouched_by_a_failing_verify(cache):
    cache.verify()
    before = cache.state.read_bytes()
    cache.version = 5
    cache.sign()
    (cache.root / "extra").write_bytes(b"x")
    assert cache.reason() == "extra-file"
    assert cache.state.read_bytes() == before  # v5 was not recorded: checks had failed


def test_corrupt_state_fails_closed(cache):
    cache.state.parent.mkdir(parents=True)
    cache.state.write_bytes(b"{nope")
    assert cache.reason() == "bad-state"


def test_expired_freeze(cache):
    assert cache.reason(now=T0 + timedelta(days=7)) == "expired"
    assert cache.reason(now=datetime(2027, 1, 1)) == "expired"  # naive: taken as UTC


# ---------------------------------------------------------------- signature attacks

def test_mix_and_match(cache, tmp_path):
    """Manifest of build A over the files of build B (same paths, same sizes)."""
    content_b = dict(CONTENT)
    content_b["tiles/18/1/2.jpg"] = b"\xff\xd8tile-TWO" * 50
    (tmp_path / "b").mkdir()
    build_b = Cache(tmp_path / "b", tmp_path / "keys-b", content_b, key=cache.key)
    build_b.verify(state_path=None)
    for name in ("Manifest.json", "Manifest.json.dsse"):
        shutil.copy(cache.root / name, build_b.root / name)
    assert build_b.reason() == "hash-mismatch"


def test_unknown_key(cache):
    other = Ed25519PrivateKey.generate()
    assert cache.reason(trusted={keyid(other): other.public_key()}) == "unknown-key"


def test_no_trusted_keys(cache):
    assert cache.reason(trusted={}) == "no-trusted-keys"


def _edit_envelope(cache, edit):
    path = cache.root / "Manifest.json.dsse"
    env = json.loads(path.read_bytes())
    edit(env)
    path.write_bytes(json.dumps(env).encode())
    return env


def test_edited_payload(cache):
    def bump(env):
        body = json.loads(base64.b64decode(env["payload"]))
        body["version"] = 99
        env["payload"] = base64.b64encode(mf.dumps_manifest(body)).decode()

    env = _edit_envelope(cache, bump)
    (cache.root / "Manifest.json").write_bytes(base64.b64decode(env["payload"]))
    assert cache.reason() == "bad-signature"


def test_edited_payload_type(cache):
    _edit_envelope(cache, lambda env: env.update(payloadType="application/json"))
    assert cache.reason() == "bad-payload-type"


def test_duplicated_signature_does_not_meet_threshold_two(cache):
    _edit_envelope(cache, lambda env: env["signatures"].append(dict(env["signatures"][0])))
    assert cache.reason(threshold=2) == "threshold"


def test_two_distinct_signers_meet_threshold_two(cache):
    second = Ed25519PrivateKey.generate()
    payload = (cache.root / "Manifest.json").read_bytes()
    extra = sign_envelope(payload, PAYLOAD_TYPE, second)["signatures"]
    _edit_envelope(cache, lambda env: env["signatures"].extend(extra))
    trusted = {**cache.trusted, keyid(second): second.public_key()}
    assert cache.verify(trusted=trusted, threshold=2).version == 1


def test_envelope_and_manifest_disagree(cache):
    path = cache.root / "Manifest.json"
    path.write_bytes(path.read_bytes().replace(b'"build-A"', b'"build-B"'))
    assert cache.reason() == "envelope-mismatch"


@pytest.mark.parametrize("name", ["Manifest.json", "Manifest.json.dsse"])
def test_missing_manifest_or_envelope(cache, name):
    (cache.root / name).unlink()
    assert cache.reason() == "missing-manifest"


def test_envelope_not_json(cache):
    (cache.root / "Manifest.json.dsse").write_bytes(b"\x00garbage")
    assert cache.reason() == "bad-envelope"


# ---------------------------------------------------------------- airborne

def test_airborne_platform_mismatch(cache):
    flight_image(cache)
    assert cache.reason(airborne_fingerprints={"onnxruntime": "ort-1.31-aarch64"}) == \
        "platform-mismatch"
    assert cache.reason(airborne_fingerprints={"openvino": "x"}) == "platform-mismatch"


def test_error_json(cache):
    (cache.root / "tiles/18/2/1.png").unlink()
    with pytest.raises(VerifyError) as info:
        cache.verify()
    out = verify_to_json(info.value)
    assert out == {"ok": False, "reason": "missing-file", "message": str(info.value),
                   "path": "tiles/18/2/1.png", "exit_code": EXIT_CODES["missing-file"]}
    assert "doit build_cache" in out["message"]


def test_unwritable_state_fails_closed(cache, tmp_path):
    (tmp_path / "afile").write_bytes(b"x")
    assert cache.reason(state_path=tmp_path / "afile" / "state.json") == "bad-state"
