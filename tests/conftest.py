"""Shared fixtures: a small real cache (synthetic tiles, generated ONNX, real key) built by real
doit runs."""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from c10.tools import netgen, synth
from c10.tools.project import init_cache
from c10.trust.keys import generate_key, keyid, load_signing_key, public_key_pem

# The tests never touch this host's own c10 state (trust store, verifier state, build ledgers,
# demo keys): their own XDG dirs, inherited by every subprocess they start.
_HOST = Path(tempfile.mkdtemp(prefix="c10-tests-host-"))
os.environ["XDG_STATE_HOME"] = str(_HOST / "state")
os.environ["XDG_CONFIG_HOME"] = str(_HOST / "config")

# ~40 tiles at zoom 15 near Kyiv, 4x4-tile blocks: several shards, fast to embed.
BBOX = (50.43, 30.49, 50.47, 30.56)
ZOOMS = (15,)


@pytest.fixture(scope="session")
def operator_key(tmp_path_factory) -> tuple[Path, Path, str]:
    """(private key, public key PEM, keyid), outside every cache."""
    d = tmp_path_factory.mktemp("keys")
    key = d / "operator.pem"
    generate_key(key)
    signer = load_signing_key(key, passphrase=None, cache_root=None)
    pub = d / "operator.pub.pem"
    pub.write_bytes(public_key_pem(signer))
    return key, pub, keyid(signer)


@pytest.fixture(scope="session")
def inputs(tmp_path_factory) -> Path:
    """Tiles and a small global model, made once and copied into each cache."""
    d = tmp_path_factory.mktemp("inputs")
    synth.make_tiles(d / "tiles", BBOX, ZOOMS, size=128)
    netgen.write_global_model(d / "models" / "global.onnx", input_size=64, dim=64)
    return d


def make_cache(root: Path, inputs: Path, key: tuple, *, block: int = 4,
               backend: str = "onnxruntime", factory: str = "Flat") -> Path:
    """A cache dir with tiles, one global model and a c10.toml pointing at `key`."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(inputs / "tiles", root / "tiles")
    shutil.copytree(inputs / "models", root / "models")
    init_cache(root, bbox=str(list(BBOX)), zooms=str(list(ZOOMS)), backend=backend, size=64,
               key=str(key[0]), allowed=f'["{key[2]}"]')
    text = (root / "c10.toml").read_text()
    text = re.sub(r"\[models\.local\].*?(?=\[shards\])", "", text, flags=re.S)
    text = text.replace("block = 16", f"block = {block}").replace('factory = "Flat"',
                                                               f'factory = "{factory}"')
    # Missing tiles fail a build by default: these caches opt out, as many tests remove a tile
    # (tests/test_request_defaults.py covers the default)
    text = text.replace("require_complete = true", "require_complete = false")
    (root / "c10.toml").write_text(text)
    return root


@pytest.fixture
def onnx_file(tmp_path) -> Path:
    """A tiny CNN with a dynamic batch (the engine and backend tests' model)."""
    from tiny_models import tiny_cnn

    return tiny_cnn(tmp_path / "models" / "global.onnx")


@pytest.fixture
def cache(tmp_path, inputs, operator_key) -> Path:
    return make_cache(tmp_path / "cache", inputs, operator_key)


@pytest.fixture
def built_cache(cache, capsys) -> Path:
    """`cache`, built once in process (its output swallowed)."""
    from c10.rules.driver import run_build

    assert run_build(cache) == 0, capsys.readouterr().out
    capsys.readouterr()
    return cache


@pytest.fixture
def pub(operator_key) -> Path:
    """The operator key's public half: what a verifier is given."""
    return operator_key[1]


def executed(output: str) -> list[str]:
    """Task names doit executed (". name"), in order, from its output."""
    return [m.group(1) for m in re.finditer(r"^\.  (\S+)", output, re.M)]


def build(root: Path, capsys, *args) -> tuple[int, str]:
    """Run doit ARGS (default build_cache) in-process on `root`: (exit code, everything printed)."""
    from c10.rules.driver import run_build

    code = run_build(root, list(args) or ["build_cache"])
    out = capsys.readouterr()
    return code, out.out + out.err


def built(root: Path, capsys) -> str:
    """A build that must succeed; its output."""
    code, out = build(root, capsys)
    assert code == 0, out
    return out


def plan_of(root: Path):
    """The plan of a cache as a build loads it (nothing saved)."""
    from c10.plan import load_plan
    from c10.store.hashcache import HashCache

    return load_plan(root, HashCache(root))


def current(root: Path, logical: str) -> Path:
    """The content-named file the build's ref names for `logical`
    (e.g. shards/global/15/1-2.npy)."""
    from c10.store.refs import current_path

    path = current_path(root, logical)
    assert path is not None and path.is_file(), f"no current {logical} in {root}"
    return path


def current_files(root: Path, top: str) -> dict[str, Path]:
    """logical path -> current file of every ref under .c10/refs/{top} (e.g. shards/global)."""
    refs = root / ".c10/refs"
    logicals = [p.relative_to(refs).as_posix().removesuffix(".json")
                for p in sorted((refs / top).rglob("*.json"))]
    return {rel: current(root, rel) for rel in logicals}


def api_request(cache: Path, key: tuple, **changes):
    """The seed's BuildRequest for a test cache (STABLE_REAR, the test bbox and zooms)."""
    from c10.api import Bbox, BuildRequest, SectorClassification

    values = dict(bbox=Bbox(*BBOX), zoom_levels=ZOOMS,
                  sector_class=SectorClassification.STABLE_REAR,
                  calibration_path=cache.parent / "no-int8-here.cache", cache_root=cache,
                  key_path=key[0])
    return BuildRequest(**(values | changes))


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with its size and mtime: proves a call wrote nothing."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


def rewrite(path: Path, data: bytes) -> None:
    """Give a tile new bytes as a copy tool does: a new file renamed over it. (An in-place
    rewrite changes no directory stat, so only a full-stat build sees it: tests of that mode
    write in place on purpose.)"""
    tmp = Path(path).with_name(Path(path).name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, path)
