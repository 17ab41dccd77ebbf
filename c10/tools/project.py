"""A cache's control files as `c10 init` writes them: dodo.py, doit.cfg, c10.toml."""
from __future__ import annotations

from pathlib import Path

from c10.errors import ConfigError
from c10.store import atomic
from c10.store.layout import CONFIG_NAME, CONTROL_DIR, DODO_NAME, DOIT_CFG_NAME

DODO_PY = '''\
"""This cache's build graph is c10's own: `doit list` shows it, `c10 init` wrote this file.

doit loads the graph through c10's loader, which doit.cfg beside this file names: doit then
imports nothing from this directory, so nothing planted here (bytecode, a module) can run in a
build. doit reads this file only when doit.cfg is gone.
"""
raise SystemExit("dodo.py: doit.cfg is missing here, so doit read this file instead of using c10's "
                 "loader; run `c10 init .` to write doit.cfg again, then re-run doit")
'''

# What `c10 init` wrote before c10 0.2 (it imported a top-level `rules`): replaced, never kept.
OLD_DODO_PY = ('"""The c10 build graph of this cache directory (written by `c10 init`): '
               '''`doit list` shows the tasks."""
from rules import DOIT_CONFIG  # noqa: F401
from rules.tasks import *  # noqa: F401,F403  (every task_* generator: the graph grows with c10)
''',)

DOIT_CFG = '''\
# doit's settings for this cache (written by `c10 init`): load the build graph through c10's
# installed loader, never by importing a file from this directory (see dodo.py).
[GLOBAL]
loader = c10
'''

CONFIG_TOML = '''# c10.toml: the build request of this takeoff cache. `doit build_cache` reads it.

[area]
# Sector to cover, in degrees: [lat_min, lon_min, lat_max, lon_max] (WGS84).
bbox = {bbox}
# XYZ zoom levels whose tiles are embedded; tiles live in tiles/{{z}}/{{x}}/{{y}}.jpg|png|webp.
zooms = {zooms}
# "stable_rear" or "active_conflict": sets signing.validity_days unless this file sets it
# (stable_rear 30 days, active_conflict 7: a front line's imagery goes stale in days).
sector_class = "stable_rear"
# Tiles missing inside bbox/zooms make the build a FAILURE (the default in every sector); false
# signs an incomplete area (`c10 map` shows where the holes are).
require_complete = true
# The sector's name, signed into the Manifest: `c10 verify --area NAME` refuses any other.
# name = "sector-7"

[engines]
# "auto" picks tensorrt, then openvino, then onnxruntime (whichever is installed and usable).
backend = "{backend}"
workspace_mb = 1024

# One table per network. role: "global" (tile descriptor, indexed), "local", "matcher".
[models.global]
path = "models/global.onnx"
role = "global"
input_size = [{size}, {size}]
precision = "fp32"          # fp32, fp16, bf16, int8 (on its tiles; TensorRT: calibration)
mean = [0.485, 0.456, 0.406]
std = [0.229, 0.224, 0.225]
channel_order = "rgb"
resize = "bilinear"
batch_size = 32

[models.local]
path = "models/local.onnx"
role = "local"
input_size = [256, 256]

[models.matcher]
path = "models/matcher.onnx"
role = "matcher"
input_size = []

[shards]
# A shard holds block x block tiles of one zoom; a new tile re-embeds only its block.
block = 16
# Retrieval windows of the global models, in tiles: 0.5 adds a window at every half-tile offset
# (a frame that straddles tiles finds one centred on it; about 4x the embeddings), 1/3 or 0.25
# finer; 1 (the default): tiles only.
# stride = 0.5

[index]
# Any faiss.index_factory string: "Flat" is exact (fine below ~50k tiles), "HNSW32,Flat" scales
# to ~1e5; "IVF1024,SQ8" at ~1e6 grows: trained once, updated per changed shard (docs/scale.md).
factory = "Flat"
metric = "ip"
ef_construction = 40
ef_search = 64
# IVF factories only: lists probed per query; rows trained on; bump to retrain; drift to retrain at
# nprobe = 16
# train_sample = 65536
# train_generation = 1
# retrain_drift = 1.25

[signing]
# The operator's Ed25519 key, OUTSIDE this directory (`c10 keygen PATH` makes one).
key = "{key}"
# passphrase_file = "/path/to/passphrase"   # for an encrypted key; never on the command line
# Key ids allowed to sign this cache (empty: any key). `c10 keygen` prints the id.
allowed_keyids = {allowed}
# Days until the Manifest expires; the aircraft refuses an expired cache. Default by
# area.sector_class: 30 (stable_rear), 7 (active_conflict).
# validity_days = 30

# Where shards are embedded (not part of the request: the cache is the same either way).
# [executor]
# kind = "dask"                        # "local" (default) or "dask": workers of a Dask scheduler
# scheduler = "tcp://10.0.0.5:8786"    # what `dask scheduler` prints; workers need c10 installed
# tiles = "bytes"                      # "bytes": tiles travel to workers; "shared": workers \
read them
# shared_root = "/mnt/sector-7"        # with tiles = "shared": this cache as the workers mount it
'''

DEFAULTS = {"bbox": "[50.40, 30.45, 50.48, 30.60]", "zooms": "[15]", "backend": "auto", "size": 224,
            "key": "~/.config/c10/operator.pem", "allowed": "[]"}


def init_cache(root: Path, **values) -> list[str]:
    """Write dodo.py, doit.cfg and c10.toml into `root`, creating it (and its parents) if missing:
    init is where the operator places a cache (seed CP-INV-5: a build never creates one). Never
    overwrites anything but an older c10's own dodo.py. Returns what was skipped."""
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{root}: exists and is not a directory; pick a directory for the cache")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{root}: cannot create the cache directory ({exc.strerror or exc})",
                          "create it yourself or pick another path") from None
    root = root.resolve()
    skipped = []
    texts = {DODO_NAME: DODO_PY, DOIT_CFG_NAME: DOIT_CFG,
             CONFIG_NAME: CONFIG_TOML.format(**(DEFAULTS | values))}
    for name, text in texts.items():
        if (root / name).exists() and not _outdated(root / name):
            skipped.append(name)
        else:
            atomic.write_text(root / name, text)
    (root / CONTROL_DIR).mkdir(exist_ok=True)
    return skipped


def _outdated(path: Path) -> bool:
    """An older c10's dodo.py, byte for byte (nothing the user wrote)."""
    try:
        return path.name == DODO_NAME and path.read_text(encoding="utf-8") in OLD_DODO_PY
    except (OSError, UnicodeDecodeError):
        return False
