"""The aircraft's side reads only what the Manifest signs: every unsigned input that once steered a
query is now ignored, and every signed file that was tampered with is refused by name."""
from __future__ import annotations

import json
import shutil

import pytest
from listing import listed_files

from c10.errors import VerifyError
from c10.query.flight import FlightCache
from c10.trust.runtime import parse_runtime


@pytest.fixture
def built(built_cache):
    return built_cache


def answers(root, pub, frames) -> list:
    """(tile, score) of the top 3 for each frame, through a freshly opened flight cache."""
    searcher, _ = FlightCache.open(root, [pub]).searcher()
    return [[((h.z, h.x, h.y), round(h.score, 5)) for h in searcher.query_file(f, 3)]
            for f in frames]


def frames_of(root, n=4):
    return sorted((root / "tiles/15").rglob("*.jpg"))[:n]


def test_the_manifest_carries_a_runtime_spec_with_no_workstation_path(built):
    body = json.loads((built / "Manifest.json").read_bytes())
    spec = parse_runtime(body, {f["path"] for f in body["files"]})
    model = spec.models["global"]
    assert model.role == "global" and model.engine.startswith("engines/global-")
    assert model.index.metric == "ip" and model.preprocessing["input_size"] == [64, 64]
    text = (built / "Manifest.json").read_text()
    assert str(built) not in text and "/tmp" not in text and ".pem" not in text
    signing = body["request"]["signing"]
    assert set(signing) >= {"keyid", "fingerprint"} and "key" not in signing


@pytest.mark.parametrize("edit", [
    ("[models.global]", "[models.renamed]"),
    ('mean = [0.485, 0.456, 0.406]', 'mean = [0.9, 0.9, 0.9]'),
    ('metric = "ip"', 'metric = "l2"'),
    ("workspace_mb = 1024", "workspace_mb = 2048"),
    ("block = 4", "block = 8"),
])
def test_edits_to_c10_toml_do_not_steer_a_query(built, pub, edit):
    frames = frames_of(built)
    before = answers(built, pub, frames)
    config = built / "c10.toml"
    text = config.read_text()
    assert edit[0] in text
    config.write_text(text.replace(edit[0], edit[1]))
    assert answers(built, pub, frames) == before


def test_no_control_file_is_read(built, pub):
    frames = frames_of(built)
    before = answers(built, pub, frames)
    shutil.rmtree(built / ".c10")  # refs, hash caches, the tile scan memo, doit's DB
    (built / "c10.toml").unlink()
    (built / "dodo.py").unlink()
    assert answers(built, pub, frames) == before


def test_planted_self_named_index_and_engine_are_never_loaded(built, pub, tmp_path):
    frames = frames_of(built)
    before = answers(built, pub, frames)
    listed = {f["path"] for f in listed_files(built)}
    index = next(p for p in listed if p.endswith(".faiss"))
    engine = next(p for p in listed if p.startswith("engines/") and p.endswith(".onnx"))
    # another index (of other descriptors) under a self-proving name, and an engine at a made-up key
    other = index.replace(index.split(".")[-2], "0" * 16)
    (built / other).write_bytes((built / index).read_bytes()[::-1])
    (built / engine.replace(engine.split("-", 1)[1][:64], "f" * 64)).write_bytes(b"evil")
    assert answers(built, pub, frames) == before


@pytest.mark.parametrize("kind", ["index", "engine", "engine-meta", "tile"])
def test_a_tampered_signed_file_is_refused_when_read(built, pub, kind):
    rel = next(f["path"] for f in listed_files(built) if f["kind"] == kind)
    data = bytearray((built / rel).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (built / rel).write_bytes(bytes(data))
    cache = FlightCache.open(built, [pub])
    with pytest.raises(VerifyError) as info:
        searcher, _ = cache.searcher()
        tile = next(t for t, path in cache.tiles.items() if path == rel)
        cache.load_tile(tile)
    assert info.value.reason == "hash-mismatch" and info.value.path == rel


def test_a_file_the_runtime_spec_names_must_be_listed(built):
    body = json.loads((built / "Manifest.json").read_bytes())
    body["runtime"]["models"]["global"]["engine"] = "engines/elsewhere.onnx"
    with pytest.raises(VerifyError) as info:
        parse_runtime(body, {f["path"] for f in body["files"]})
    assert info.value.reason == "bad-manifest" and "engines/elsewhere.onnx" in str(info.value)


def test_an_untrusted_key_opens_nothing(built, tmp_path):
    from c10.trust.keys import generate_key, load_signing_key, public_key_pem

    generate_key(tmp_path / "other.pem")
    other = tmp_path / "other.pub"
    key = load_signing_key(tmp_path / "other.pem", passphrase=None, cache_root=None)
    other.write_bytes(public_key_pem(key))
    with pytest.raises(VerifyError) as info:
        FlightCache.open(built, [other])
    assert info.value.reason == "unknown-key"


def test_the_package_root_offers_the_flight_cache_without_the_build(tmp_path):
    import subprocess
    import sys

    code = ("import sys, c10\nc10.FlightCache\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('doit', 'c10') "
            "and (m.startswith('doit') or m.startswith('c10.rules') or m == 'c10.plan')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
