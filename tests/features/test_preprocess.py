"""Per-model preprocessing: the configured resize, mean/std and channel order, and unreadable
tiles."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from c10.config import Model
from c10.errors import ConfigError, DescriptorBatchError
from c10.features.preprocess import Preprocessing, decode, load_tensor, open_tile, to_tensor

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def image(h=40, w=56, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8), "RGB")


def reference(img: Image.Image, prep: Preprocessing) -> np.ndarray:
    """The textbook formula, written out independently of the fast path."""
    h, w = prep.input_size
    filt = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST,
            "area": Image.BOX}
    arr = np.asarray(img.resize((w, h), filt[prep.resize]), np.float64) / 255.0
    arr = (arr - np.array(prep.mean)) / np.array(prep.std)
    if prep.channel_order == "bgr":
        arr = arr[..., ::-1]
    return arr.transpose(2, 0, 1)


def tolerance(resize: str) -> float:
    """Bilinear and area resize in float (c10's matmuls); Pillow rounds to 8 bits after each of its
    two passes, so they may differ by up to one grey level. Bicubic and nearest are Pillow's own."""
    return 1.001 / (255 * min(STD)) if resize in ("bilinear", "area") else 1e-5


@pytest.mark.parametrize("order", ["rgb", "bgr"])
@pytest.mark.parametrize("resize", ["bilinear", "bicubic", "nearest", "area"])
def test_tensor_matches_the_formula(order, resize):
    prep = Preprocessing((24, 32), MEAN, STD, order, resize)
    out = to_tensor(image(), prep)
    assert out.shape == (3, 24, 32) and out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_allclose(out, reference(image(), prep), atol=tolerance(resize))


@pytest.mark.parametrize("resize", ["bilinear", "area"])
@pytest.mark.parametrize("src,dst", [((256, 256), (224, 224)), ((256, 256), (518, 518)),
                                     ((480, 640), (224, 224)), ((256, 256), (100, 77)),
                                     ((7, 9), (30, 31)), ((300, 200), (3, 2)),
                                     ((1, 1), (5, 5)), ((5, 5), (1, 1)), ((256, 256), (256, 224))])
def test_matmul_resize_is_pillows_filter_at_any_scale(resize, src, dst):
    img = image(*src, seed=sum(src))
    prep = Preprocessing(dst, MEAN, STD, "bgr", resize)
    np.testing.assert_allclose(to_tensor(img, prep), reference(img, prep), atol=tolerance(resize))


def test_resize_keeps_a_flat_image_flat_to_the_borders():
    """Every output's weights sum to 1, the zero padding included: no dark or bright edge."""
    prep = Preprocessing((224, 224), MEAN, STD)
    out = to_tensor(Image.new("RGB", (256, 256), (200, 100, 50)), prep)
    want = (np.array([200, 100, 50]) / 255 - np.array(MEAN)) / np.array(STD)
    np.testing.assert_allclose(out, np.broadcast_to(want[:, None, None], out.shape), atol=1e-5)


def test_resize_is_deterministic_across_sizes_and_threads():
    """Per-thread scratch buffers are reused: a tensor depends only on its image, bit for bit."""
    from concurrent.futures import ThreadPoolExecutor

    prep = Preprocessing((224, 224), MEAN, STD)
    tiles, other = [image(256, 256, seed) for seed in range(8)], image(300, 400, 9)
    first = [to_tensor(t, prep) for t in tiles]
    to_tensor(other, prep)
    with ThreadPoolExecutor(4) as pool:
        again = list(pool.map(lambda t: to_tensor(t, prep), tiles * 4))
    assert all(np.array_equal(a, first[i % 8]) for i, a in enumerate(again))


def test_bgr_is_rgb_with_channels_reversed():
    rgb = to_tensor(image(), Preprocessing((16, 16), MEAN, STD, "rgb"))
    bgr = to_tensor(image(), Preprocessing((16, 16), MEAN, STD, "bgr"))
    np.testing.assert_array_equal(bgr, rgb[::-1])


def test_every_setting_changes_the_tensor():
    base = Preprocessing((16, 16), MEAN, STD)
    variants = [Preprocessing((16, 16), (0.5, 0.5, 0.5), STD),
                Preprocessing((16, 16), MEAN, (0.5, 0.5, 0.5)),
                Preprocessing((16, 16), MEAN, STD, "bgr"),
                Preprocessing((16, 16), MEAN, STD, "rgb", "nearest")]
    ref = to_tensor(image(), base)
    assert all(not np.array_equal(to_tensor(image(), v), ref) for v in variants)


def test_writes_into_a_given_buffer_and_keeps_exact_size_images():
    prep = Preprocessing((40, 56), MEAN, STD)
    buf = np.zeros((2, *prep.shape), np.float32)
    out = to_tensor(image(), prep, buf[1])
    assert out.base is buf and np.array_equal(buf[1], to_tensor(image(), prep)) and not buf[0].any()


def test_from_model_takes_the_toml_settings(tmp_path):
    model = Model("g", tmp_path / "g.onnx", input_size=(48, 64), mean=(0.1, 0.2, 0.3),
                  std=(1.0, 2.0, 3.0), channel_order="bgr", resize="area")
    assert Preprocessing.from_model(model) == Preprocessing((48, 64), (0.1, 0.2, 0.3),
                                                            (1.0, 2.0, 3.0), "bgr", "area")
    with pytest.raises(ConfigError, match="models.g.input_size"):
        Preprocessing.from_model(Model("g", tmp_path / "g.onnx", input_size=None))


def test_grey_and_palette_images_become_rgb(tmp_path):
    Image.new("L", (8, 8), 77).save(tmp_path / "grey.png")
    Image.new("RGBA", (8, 8), (1, 2, 3, 4)).save(tmp_path / "alpha.png")
    assert open_tile(tmp_path / "grey.png").mode == "RGB"
    assert open_tile(tmp_path / "alpha.png").getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize("content", [b"", b"<html>404 not found</html>", "truncated"])
def test_unreadable_tile_names_the_file_and_the_next_step(tmp_path, content):
    path = tmp_path / "tiles" / "15" / "1" / "2.jpg"
    path.parent.mkdir(parents=True)
    image(64, 64).save(path, "JPEG")
    path.write_bytes(path.read_bytes()[:300] if content == "truncated" else content)
    with pytest.raises(DescriptorBatchError) as err:
        load_tensor(path, Preprocessing((16, 16), MEAN, STD))
    assert str(path) in str(err.value) and "re-download or delete" in str(err.value)
    assert "doit build_cache" in str(err.value)


@pytest.mark.parametrize("mode, subsampling", [("RGB", 0), ("RGB", 2), ("L", 0), ("CMYK", 0)])
def test_jpeg_decodes_to_pillows_pixels(tmp_path, mode, subsampling):
    """simplejpeg (RGB and grey JPEGs) and Pillow (CMYK, which simplejpeg refuses) give the same
    pixels."""
    path = tmp_path / "t.jpg"
    image(64, 48, seed=3).convert(mode).save(path, "JPEG", quality=90, subsampling=subsampling)
    pixels = decode(path)
    assert pixels.shape == (64, 48, 3) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels, np.asarray(Image.open(path).convert("RGB")))
    np.testing.assert_array_equal(np.asarray(open_tile(path)), pixels)


def test_a_jpeg_cut_short_in_its_scan_is_refused(tmp_path):
    """simplejpeg would fill the missing rows grey; the strict decode hands it to Pillow, which
    refuses."""
    path = tmp_path / "cut.jpg"
    image(256, 256).save(path, "JPEG", quality=95)
    path.write_bytes(path.read_bytes()[:-2000])
    with pytest.raises(DescriptorBatchError, match="corrupt, truncated"):
        decode(path)


def test_a_jpeg_over_pillows_pixel_limit_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "big.jpg"
    image(64, 64).save(path, "JPEG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses past twice its limit
    with pytest.raises(DescriptorBatchError, match="not a tile"):
        decode(path)
