"""`c10 demo DIR`: synthetic tiles, generated networks, a throwaway key, a real build and verify."""
from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Callable

from c10.errors import ConfigError
from c10.store.layout import CONFIG_NAME

# Kyiv, a real bbox: the demo's tiles sit where real ones would.
CENTER = (50.4501, 30.5234)
ZOOMS = (15, 16)


def demo_bbox(tiles: int, zooms: tuple[int, ...] = ZOOMS) -> tuple[float, float, float, float]:
    """A bbox around CENTER holding about `tiles` tiles over `zooms` (each zoom quarters the
    count)."""
    top = max(zooms)
    share = sum(4.0 ** (z - top) for z in zooms)
    side = math.sqrt(max(tiles, 4) / share)  # tiles per side at the top zoom
    dlon = side * 360.0 / 2 ** top / 2
    dlat = dlon * math.cos(math.radians(CENTER[0]))
    lat, lon = CENTER
    return (round(lat - dlat, 6), round(lon - dlon, 6), round(lat + dlat, 6), round(lon + dlon, 6))


def demo_key_path(root: Path) -> Path:
    """The demo's throwaway key: in the user's state dir, never inside the cache."""
    from c10.store.host import state_dir

    tag = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]
    return state_dir() / "demo-keys" / f"{root.resolve().name}-{tag}.pem"


def make_demo(root: Path, build: Callable[[Path], int], *, tiles: int = 300,
              key: Path | None = None, backend: str = "auto", real_models: bool = False,
              keypoints: int = 256, stride: float | None = None) -> int:
    """Create (or refresh) the demo cache at `root`, build it with `build` (the doit layer's
    run_build: this module stays doit-free), verify it, and say what was made.

    real_models: pretrained ALIKED and ALIKED-LightGlue (c10 export-models) instead of generated
    networks; stride: shards.stride (retrieval windows at 1/stride-tile offsets when < 1; default
    0.5 with real models, whose frames then localize, else 1)."""
    root = Path(root)
    _check_target(root)
    root.mkdir(parents=True, exist_ok=True)
    key = key or demo_key_path(root)
    t0 = time.perf_counter()
    bbox, kid, pub = _prepare(root, tiles, key, backend, keypoints if real_models else None)
    stride = stride if stride is not None else 0.5 if real_models else 1.0
    if stride != 1:
        _set_stride(root / CONFIG_NAME, stride)
    prep_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    code = build(root)
    build_s = time.perf_counter() - t1
    if code != 0:
        print(f"c10 demo: the build failed (exit {code}); see the message above")
        return code
    return _verify_and_report(root, pub, key, prep_s, build_s)


def _check_target(root: Path) -> None:
    """Never take over a directory the user made for something else."""
    if root.exists() and any(root.iterdir()) and not (root / CONFIG_NAME).exists():
        raise ConfigError(f"{root}: exists and is not a c10 cache; "
                          "pick an empty or new directory for the demo")


def _prepare(root: Path, tiles: int, key: Path, backend: str, keypoints: int | None = None):
    from c10.store import atomic
    from c10.tools import netgen, synth
    from c10.tools.project import init_cache
    from c10.trust.keys import generate_key, keyid, load_signing_key, public_key_pem

    bbox = demo_bbox(tiles)
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        generate_key(key)
    signer = load_signing_key(key, passphrase=None, cache_root=root)
    pub = key.with_suffix(".pub.pem")
    atomic.write_bytes(pub, public_key_pem(signer))
    kid = keyid(signer)
    init_cache(root, bbox=f"[{', '.join(map(str, bbox))}]", zooms=str(list(ZOOMS)), backend=backend,
               key=str(key), allowed=f'["{kid}"]')
    models = root / "models"
    if keypoints is not None:
        networks = _real_models(root, keypoints)
    elif not (models / "global.onnx").exists():
        netgen.write_demo_models(models)
    if keypoints is None:
        networks = "3 generated ONNX networks"
    made = synth.make_tiles(root / "tiles", bbox, ZOOMS) if not (root / "tiles").exists() else []
    print(f"c10 demo: {len(made)} synthetic tiles over bbox {list(bbox)} at zooms {list(ZOOMS)}, "
          f"{networks}, key {key} (keyid {kid[:16]}...)")
    return bbox, kid, pub


def _set_stride(path: Path, stride: float) -> None:
    """shards.stride in the demo's c10.toml (tomlkit: its comments stay)."""
    import tomlkit

    from c10.store import atomic

    doc = tomlkit.parse(path.read_text())
    doc["shards"]["stride"] = stride
    atomic.write_text(path, tomlkit.dumps(doc))


def _real_models(root: Path, keypoints: int) -> str:
    """Export the pretrained networks into models/ and point c10.toml's [models.*] tables at them,
    unless the operator edited those tables (as `c10 export-models` does, without --force)."""
    from c10.tools.export import export_models, models_toml
    from c10.tools.export.tables import plan_models_tables, write_models_tables

    export_models(root, keypoints=keypoints, log=lambda line: print(f"c10 demo: {line}"))
    # after the export: a failure leaves c10.toml as it was
    update = plan_models_tables(root / CONFIG_NAME, models_toml(keypoints))
    if update.refused():
        print(f"c10 demo: {root / CONFIG_NAME}: [models.*] edited by hand, left as they are")
    else:
        write_models_tables(update)
    return f"pretrained ALIKED-n16 + ALIKED-LightGlue ({keypoints} keypoints)"


def _verify_and_report(root: Path, pub: Path, key: Path, prep_s: float, build_s: float) -> int:
    import datetime as dt

    from c10.trust.keys import load_trusted_keys
    from c10.trust.verify import verify_cache

    state = key.parent / f"{key.stem}.verify-state.json"
    result = verify_cache(root, trusted=load_trusted_keys([str(pub)]),
                          now=dt.datetime.now(dt.timezone.utc), state_path=state)
    print(f"c10 demo: built {root} in {build_s:.1f} s (inputs made in {prep_s:.1f} s)")
    for sub in ("engines", "shards", "index"):
        files = [p for p in (root / sub).rglob("*") if p.is_file()]
        print(f"  {sub + '/':9} {len(files):4d} files, "
              f"{sum(p.stat().st_size for p in files) / 1e6:7.2f} MB")
    print(f"c10 verify: OK: Manifest v{result.version}, {result.files} files, "
          f"{result.bytes / 1e6:.1f} MB checked in {result.elapsed:.2f} s")
    print(f"next: c10 verify {root} --trusted-keys {pub}")
    print(f"      c10 pack {root} {root}-image --trusted-keys {pub}   # the flight image")
    print(f"      c10 verify {root}-image --airborne --trusted-keys {pub}   # as the aircraft does")
    print(f"      c10 query {root}-image IMAGE --trusted-keys {pub}   # only what is signed")
    print(f"      cd {root} && doit build_cache   "
          "# a no-op now; add tiles and it redoes only their blocks")
    return 0
