"""Synthetic tiles: right z/x/y files, deterministic bytes, distinct content, perturbations."""
from __future__ import annotations

import mercantile
import numpy as np
import pytest
from PIL import Image

from c10.errors import ConfigError
from c10.tools import synth

KYIV = (50.448, 30.518, 50.452, 30.526)  # lat_min, lon_min, lat_max, lon_max


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)


def test_tiles_written_at_xyz_paths(tmp_path):
    ids = synth.make_tiles(tmp_path, KYIV, [15, 16])
    expected = sorted((t.z, t.x, t.y)
                      for t in mercantile.tiles(30.518, 50.448, 30.526, 50.452, [15, 16]))
    assert ids == expected
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.jpg"))
    assert files == sorted(f"{z}/{x}/{y}.jpg" for z, x, y in ids)
    assert Image.open(tmp_path / "16/{1}/{2}.jpg".format(*ids[-1])).size == (256, 256)


def test_bytes_are_deterministic(tmp_path):
    for run in ("a", "b"):
        synth.make_tiles(tmp_path / run, KYIV, [16], fmt="png", seed=3)
    for path in (tmp_path / "a").rglob("*.png"):
        assert path.read_bytes() == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes()


def test_tiles_differ_from_each_other():
    imgs = [np.asarray(synth.render_tile(16, 38300 + i, 22000 + j), dtype=np.float32)
            for i in range(4) for j in range(3)]
    for a in range(len(imgs)):
        for b in range(a + 1, len(imgs)):
            assert np.abs(imgs[a] - imgs[b]).mean() > 10


def test_seed_changes_the_terrain():
    a = np.asarray(synth.render_tile(16, 38300, 22000, seed=0), dtype=np.float32)
    b = np.asarray(synth.render_tile(16, 38300, 22000, seed=1), dtype=np.float32)
    assert np.abs(a - b).mean() > 10


def test_terrain_continues_across_tile_border():
    left = np.asarray(synth.render_tile(16, 38300, 22000), dtype=np.float32)
    right = np.asarray(synth.render_tile(16, 38301, 22000), dtype=np.float32)
    across = np.abs(left[:, -1] - right[:, 0]).mean()
    far = np.abs(left[:, 0] - right[:, 0]).mean()
    assert across < far / 2


def test_bad_bbox_and_format_raise_config_error(tmp_path):
    with pytest.raises(ConfigError, match="bbox"):
        synth.make_tiles(tmp_path, (50.5, 30.5, 50.4, 30.6), [15])
    with pytest.raises(ConfigError, match="format"):
        synth.make_tiles(tmp_path, KYIV, [15], fmt="tif")
