"""models.NAME.decode = "scaled": JPEGs of at least twice the input decode in libjpeg-turbo's
scaled IDCT, the pixels Pillow's draft mode gives, within a few grey levels of the full decode's
tensor; the mode is in the embedding identity (and only when set), so no row crosses modes."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from c10.config import Model
from c10.errors import ConfigError
from c10.features.preprocess import Preprocessing, decode, load_tensor, scaled_size, to_tensor
from c10.tools import synth

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FULL = Preprocessing((224, 224), MEAN, STD)
SCALED = Preprocessing((224, 224), MEAN, STD, decode="scaled")


def tile(tmp_path: Path, size: int, fmt: str = "jpg") -> Path:
    path = tmp_path / f"{size}.{fmt}"
    img = synth.render_tile(16, 39000, 22000, size=min(size, 512))  # larger: upscaled (faster)
    path.write_bytes(synth.encode(img.resize((size, size), Image.BILINEAR), fmt))
    return path


@pytest.mark.parametrize("size,want", [
    ((256, 256), None), ((447, 512), None), ((448, 448), (224, 224)), ((512, 512), (256, 256)),
    ((513, 513), (257, 257)), ((1024, 1024), (256, 256)), ((2048, 4096), (256, 512)),
    ((480, 640), (240, 320)), ((4000, 4000), (500, 500))])
def test_the_largest_power_of_two_reduction_that_keeps_the_input_size(size, want):
    assert scaled_size(size, SCALED) == want


@pytest.mark.parametrize("size", [448, 512, 1024])
def test_scaled_pixels_are_pillows_draft_decode(tmp_path, size):
    """An independent decoder (Pillow's libjpeg-turbo, draft mode) gives the very same pixels."""
    path = tile(tmp_path, size)
    got = decode(path, SCALED)
    assert got.shape[:2] == scaled_size((size, size), SCALED)
    with Image.open(path) as img:
        img.draft("RGB", got.shape[1::-1])
        want = np.asarray(img.convert("RGB"))
    np.testing.assert_array_equal(got, want)


def test_scaled_tensor_is_within_a_few_grey_levels_of_the_full_decode(tmp_path):
    path = tile(tmp_path, 512)
    full, scaled = load_tensor(path, FULL), load_tensor(path, SCALED)
    grey = np.abs(scaled - full) * 255 * np.asarray(STD)[:, None, None]  # in 8-bit levels
    assert 0.2 < grey.mean() < 3.0 and np.percentile(grey, 99) < 15  # measured 1.27 and 7.2
    assert not np.array_equal(full, scaled)  # a real change: hence its own identity


def test_tiles_below_twice_the_input_and_other_formats_decode_in_full(tmp_path):
    for path in (tile(tmp_path, 256), tile(tmp_path, 512, "png")):
        np.testing.assert_array_equal(decode(path, SCALED), decode(path))
        np.testing.assert_array_equal(load_tensor(path, SCALED), load_tensor(path, FULL))


def test_a_query_image_in_memory_decodes_as_a_tile_file_does(tmp_path):
    path = tile(tmp_path, 1024)
    got = decode(io.BytesIO(path.read_bytes()), SCALED)
    np.testing.assert_array_equal(got, decode(path, SCALED))
    np.testing.assert_array_equal(to_tensor(got, SCALED), load_tensor(path, SCALED))


def test_the_mode_is_in_the_preprocessing_identity_only_when_set(tmp_path):
    base = Model("global", tmp_path / "m.onnx")
    scaled = Model("global", tmp_path / "m.onnx", decode="scaled")
    assert "decode" not in base.preprocessing()  # caches without the key keep their identity
    assert scaled.preprocessing() == base.preprocessing() | {"decode": "scaled"}
    assert Preprocessing.from_model(scaled) == SCALED and Preprocessing.from_model(base) == FULL


def test_a_bad_mode_or_a_scaled_local_model_is_refused_naming_the_key(tmp_path):
    from c10.config import load_config

    (tmp_path / "m.onnx").write_bytes(b"x")
    base = ('[area]\nbbox = [50.43, 30.49, 50.47, 30.56]\nzooms = [15]\n'
            '[models.{name}]\npath = "m.onnx"\nrole = "{role}"\ndecode = "{mode}"\n')
    for name, role, mode, says in (("global", "global", "draft", "allowed: full, scaled"),
                                   ("local", "local", "scaled", "global models only")):
        (tmp_path / "c10.toml").write_text(base.format(name=name, role=role, mode=mode))
        with pytest.raises(ConfigError, match=rf"models\.{name}\.decode.*{says}"):
            load_config(tmp_path)


def test_the_request_names_the_mode_only_when_it_is_not_full(tmp_path):
    from c10.config import load_config

    (tmp_path / "m.onnx").write_bytes(b"x")
    base = ('[area]\nbbox = [50.43, 30.49, 50.47, 30.56]\nzooms = [15]\n'
            '[models.global]\npath = "m.onnx"\n')
    for extra, want in (("", None), ('decode = "full"\n', None), ('decode = "scaled"\n', "scaled")):
        (tmp_path / "c10.toml").write_text(base + extra)
        model = load_config(tmp_path).request()["models"]["global"]
        assert model.get("decode") == want
