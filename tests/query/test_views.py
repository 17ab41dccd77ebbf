"""Camera-like views of tiles: the perturbations the selftests query with."""
from __future__ import annotations

import numpy as np
import pytest

from c10.errors import ConfigError
from c10.query.views import perturb
from c10.tools import synth


@pytest.mark.parametrize("strength", ["mild", "strong"])
def test_perturb_keeps_size_and_changes_pixels(strength):
    tile = synth.render_tile(16, 38300, 22000)
    rng = np.random.default_rng(0)
    out = perturb(tile, rng, strength)
    assert out.size == tile.size and out.mode == "RGB"
    diff = np.abs(np.asarray(out, dtype=np.float32) - np.asarray(tile, dtype=np.float32)).mean()
    assert diff > 1
    again = perturb(tile, np.random.default_rng(0), strength)
    assert np.array_equal(np.asarray(out), np.asarray(again))


def test_perturb_rejects_unknown_strength():
    with pytest.raises(ConfigError):
        perturb(synth.render_tile(16, 1, 1), np.random.default_rng(0), "wild")
