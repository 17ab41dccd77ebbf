"""Hostile and broken input through real builds: one clear error naming the file and the next
step, nothing lost."""
from __future__ import annotations

import errno
import io
import os
import re
import shutil

import numpy as np
import pytest
from conftest import current, make_cache, rewrite
from PIL import Image

from c10.cli import main as c10_main
from c10.errors import CacheRootMissingError
from c10.rules.driver import run_build

NOT_LOST = ("tiles", "models", "engines", "shards", "index")


@pytest.fixture(scope="module")
def built_once(tmp_path_factory, inputs, operator_key):
    root = make_cache(tmp_path_factory.mktemp("built") / "cache", inputs, operator_key)
    assert run_build(root) == 0
    return root


@pytest.fixture
def built(built_once, tmp_path, capsys):
    """A copy of a cache built once (Manifest v1): the state a broken input meets."""
    root = tmp_path / "cache"
    shutil.copytree(built_once, root, symlinks=True)
    capsys.readouterr()
    return root


def snapshot(root) -> dict[str, bytes]:
    """Every file a build must not lose or change when it fails: inputs, outputs, the Manifest
    pair."""
    files = {p.relative_to(root).as_posix(): p.read_bytes()
             for top in NOT_LOST if (root / top).is_dir()
             for p in (root / top).rglob("*") if p.is_file()}
    for name in ("c10.toml", "Manifest.json", "Manifest.json.dsse"):
        if (root / name).exists():
            files[name] = (root / name).read_bytes()
    return files


def fails(root, capsys, *needles: str) -> str:
    code = run_build(root)
    out = capsys.readouterr()
    out = out.out + out.err
    assert code != 0, out
    assert "Traceback" not in out, out
    for needle in needles:
        assert needle in out, f"{needle!r} not in:\n{out}"
    return out


def succeeds(root, capsys) -> str:
    code = run_build(root)
    out = capsys.readouterr().out
    assert code == 0, out
    return out


def tiles_of(root) -> list:
    return sorted((root / "tiles/15").rglob("*.jpg"))


# ---------------------------------------------------------------- tiles

@pytest.mark.parametrize("damage", [
    lambda b: b"",                       # empty (a download that never started)
    lambda b: b[: len(b) // 3],          # truncated (a download cut short)
    lambda b: b"<html>503 Service Unavailable</html>\n",  # not an image (an error page)
], ids=["empty", "truncated", "not-an-image"])
def test_broken_tile_names_itself_and_loses_nothing(built, capsys, damage):  # also CP-TC-9
    tile = tiles_of(built)[7]
    rewrite(tile, damage(tile.read_bytes()))
    before = snapshot(built)
    out = fails(built, capsys, "DescriptorBatchError", str(tile), "re-download or delete this tile",
                "doit build_cache")
    # the broken tile itself is kept, as is every engine/shard
    assert snapshot(built) == before, out
    tile.unlink()  # the next step the message names
    succeeds(built, capsys)


def test_a_tile_of_another_pixel_size_is_resized_like_every_tile(built, capsys):
    from c10.features.shards import read_shard

    tile = tiles_of(built)[7]
    x, y = int(tile.parent.name), int(tile.stem)
    shard = f"shards/global/15/{x // 4}-{y // 4}.npy"
    before = _descriptor(read_shard(current(built, shard)), x, y)
    with Image.open(tile) as img:  # a 2x "retina" tile of the same ground, among 128-px tiles
        buf = io.BytesIO()
        img.resize((img.width * 2, img.height * 2), Image.BICUBIC).save(buf, "JPEG", quality=90)
    rewrite(tile, buf.getvalue())
    succeeds(built, capsys)
    after = _descriptor(read_shard(current(built, shard)), x, y)
    assert float(before @ after) > 0.95  # the same footprint: nearly the same descriptor


def _descriptor(rows, x, y):
    return rows["desc"][(rows["x"] == x) & (rows["y"] == y)][0]


def test_files_in_tiles_that_are_not_zxy_are_named(built, capsys):
    column = tiles_of(built)[0].parent
    strays = [column / "notes.txt", built / "tiles/15/abc/1.jpg", built / "tiles/README",
              column / "012.jpg"]
    for path in strays:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    before = snapshot(built)
    out = fails(built, capsys, "ManifestCoverageError", "tiles/{z}/{x}/{y}",
                "previous Manifest stays in force")
    for path in strays[:3]:
        assert path.relative_to(built).as_posix() in out
    assert snapshot(built) == before


# ---------------------------------------------------------------- models

def test_onnx_that_does_not_parse(built, capsys):
    model = built / "models/global.onnx"
    model.write_bytes(model.read_bytes()[:200])  # an interrupted copy
    before = snapshot(built)
    fails(built, capsys, "ModelError", str(model), "not a valid ONNX model", "re-export")
    assert snapshot(built) == before


def test_engine_failure_mid_corpus_keeps_finished_engines_and_manifest(built, capsys,
                                                                       tmp_path):  # CP-TC-8
    from conftest import plan_of

    from c10.features import engines
    from c10.tools import netgen

    outside = tmp_path / "models"
    netgen.write_local_model(outside / "local.onnx", input_size=64, keypoints=32)
    (outside / "matcher.onnx").write_bytes(b"\x08\x07not a protobuf")
    text = (built / "c10.toml").read_text()
    (built / "c10.toml").write_text(text.replace("[shards]", f'''[models.local]
path = "{outside / 'local.onnx'}"
role = "local"
input_size = [64, 64]

[models.matcher]
path = "{outside / 'matcher.onnx'}"
role = "matcher"
input_size = []

[shards]'''))
    manifest = (built / "Manifest.json").read_bytes(), (built / "Manifest.json.dsse").read_bytes()
    engines_before = sorted(p.name for p in (built / "engines").iterdir())
    # `doit engines` runs the models in c10.toml order (a full build's order follows doit's
    # set of implicit deps, which varies from run to run): local is built, then matcher fails.
    code = run_build(built, ["engines"])
    out = capsys.readouterr().out
    assert (code != 0 and "ModelError" in out and "matcher.onnx" in out
            and "not a valid ONNX model" in out)
    assert re.findall(r"^\.  (engines:\S+)", out, re.M)[-2:] == ["engines:local",
                                                               "engines:matcher"], out
    new = sorted(set(p.name for p in (built / "engines").iterdir()) - set(engines_before))
    # engine + sidecar, no matcher
    assert len(new) == 2 and all(n.startswith("local-") for n in new)
    fails(built, capsys, "ModelError", "matcher.onnx")  # the whole build stops there too
    assert sorted(p.name for p in (built / "engines").iterdir()) == sorted(engines_before + new)
    assert ((built / "Manifest.json").read_bytes(),
            (built / "Manifest.json.dsse").read_bytes()) == manifest
    plan = plan_of(built).plans["local"]
    # usable as built
    runner = engines.load_engine(built / plan.engine_rel, plan.spec, plan.backend)
    outs = runner.run({runner.input_names[0]: np.zeros((1, 3, 64, 64), np.float32)})
    assert outs[0].shape[:2] == (1, 32)


# ---------------------------------------------------------------- c10.toml

@pytest.mark.parametrize("edit, needle", [
    (lambda t: t.replace("[index]", "[index\n"), "TOML syntax error"),
    (lambda t: t.replace("[shards]", "[shards]\nblok = 4"), "unknown key `shards.blok`"),
    (lambda t: re.sub(r"bbox = \[.*?\]", "bbox = [50.43, 30.49, 91.0, 30.56]", t), "area.bbox"),
    (lambda t: re.sub(r"bbox = \[.*?\]", "bbox = [50.43, 30.56, 50.47, 30.49]", t), "longitudes"),
    (lambda t: t.replace("zooms = [15]", "zooms = [15, 31]"), "area.zooms"),
    (lambda t: t.replace("zooms = [15]", "zooms = [-1]"), "area.zooms"),
], ids=["syntax", "unknown-key", "lat-out-of-range", "inverted", "zoom-high", "zoom-negative"])
def test_bad_request_names_the_file_and_key(built, capsys, edit, needle):
    (built / "c10.toml").write_text(edit((built / "c10.toml").read_text()))
    before = snapshot(built)
    fails(built, capsys, "ConfigError", str(built / "c10.toml"), needle)
    assert snapshot(built) == before
    assert c10_main(["build", str(built)]) != 0  # the CLI face: one line, no traceback
    err = capsys.readouterr()
    assert needle in err.out + err.err and "Traceback" not in err.out + err.err


# ---------------------------------------------------------------- the operator key

def _set_key(root, key, passphrase_file=None) -> None:
    text = re.sub(r'^key = ".*?"', f'key = "{key}"', (root / "c10.toml").read_text(), count=1,
                  flags=re.M)
    if passphrase_file:
        text = text.replace("# passphrase_file =", f'passphrase_file = "{passphrase_file}"\n# was:')
    (root / "c10.toml").write_text(text)


def test_key_missing(cache, capsys, tmp_path):
    _set_key(cache, tmp_path / "nowhere.pem")
    fails(cache, capsys, "SigningKeyError", str(tmp_path / "nowhere.pem"))
    assert not (cache / "engines").exists() and not (cache / "Manifest.json").exists()


def test_key_unreadable(cache, capsys, tmp_path):
    (tmp_path / "dir.pem").mkdir()  # read() fails even for root, unlike mode 000
    _set_key(cache, tmp_path / "dir.pem")
    fails(cache, capsys, "SigningKeyError", str(tmp_path / "dir.pem"))
    assert not (cache / "engines").exists() and not (cache / "Manifest.json").exists()


def test_key_wrong_passphrase(built, capsys, tmp_path):
    from c10.trust.keys import generate_key

    generate_key(tmp_path / "locked.pem", passphrase=b"right horse battery")
    (tmp_path / "pass").write_text("wrong horse battery\n")
    text = (built / "c10.toml").read_text()
    (built / "c10.toml").write_text(re.sub(r"allowed_keyids = \[.*?\]", "allowed_keyids = []",
                                           text))
    _set_key(built, tmp_path / "locked.pem", tmp_path / "pass")
    rewrite(tiles_of(built)[3], tiles_of(built)[0].read_bytes())  # work to do: the key is needed
    before = snapshot(built)
    fails(built, capsys, "SigningKeyError", str(tmp_path / "locked.pem"), "passphrase")
    assert snapshot(built) == before
    (tmp_path / "pass").write_text("right horse battery\n")
    # a new key: nothing the old one signed is carried forward (c10.trust.provenance), so this
    # build queues every derived file for a rebuild and the next one makes them
    fails(built, capsys, "ManifestWriteError", "a new signing key?", "queued for a rebuild")
    succeeds(built, capsys)


# ---------------------------------------------------------------- disk full

def test_disk_full_while_writing_a_shard(built, capsys, monkeypatch):
    tile = tiles_of(built)[7]
    rewrite(tile, tiles_of(built)[0].read_bytes())
    before = snapshot(built)
    real_write = os.write

    def full_for_shards(fd, data):
        # shards are staged in .c10/tmp/ under their content names, then renamed into shards/
        if re.search(r"/\.c10/tmp/\.\d+-\d+\.[0-9a-f]{16}\.npy\.",
                     os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_for_shards)
    out = fails(built, capsys, "StorageError", "No space left on device",
                "the disk is full: free space", "doit build_cache",
                "previous Manifest stays in force")
    assert re.search(r"shards/global/15/\d+-\d+\.[0-9a-f]{16}\.npy: cannot write it", out), out
    monkeypatch.setattr(os, "write", real_write)
    assert snapshot(built) == before
    assert not [p for p in built.rglob("*.tmp")]
    succeeds(built, capsys)


# ---------------------------------------------------------------- CP-INV-5

def test_missing_cache_root_is_an_error_and_never_created(tmp_path, capsys):
    missing = tmp_path / "sector-7"
    assert c10_main(["build", str(missing)]) == CacheRootMissingError.exit_code
    err = capsys.readouterr().err
    assert "CacheRootMissingError" in err and str(missing) in err and "c10 init" in err
    with pytest.raises(CacheRootMissingError):
        run_build(missing)
    with pytest.raises(CacheRootMissingError):
        run_build(tmp_path / "not" / "even" / "the" / "parent")
    assert not missing.exists() and not (tmp_path / "not").exists()
