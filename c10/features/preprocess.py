"""Per-model tile preprocessing, applied by the same code at build and at query time."""
from __future__ import annotations

import contextlib
import functools
import io
import threading
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import simplejpeg
from numpy.lib.stride_tricks import as_strided
from PIL import Image, UnidentifiedImageError

from c10.errors import ConfigError, DescriptorBatchError

_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
             "nearest": Image.NEAREST, "area": Image.BOX}
_FIX = "re-download or delete this tile"


@dataclass(frozen=True)
class Preprocessing:
    """Resize to input_size, scale to [0, 1], subtract mean, divide by std (both in RGB), lay out
    CHW."""

    input_size: tuple[int, int]  # (H, W)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channel_order: str = "rgb"
    resize: str = "bilinear"
    decode: str = "full"  # or "scaled": JPEGs >= 2x the input decode at 1/2, 1/4 or 1/8 (decode)

    @classmethod
    def from_model(cls, model) -> "Preprocessing":
        if not model.input_size:
            raise ConfigError(f"c10.toml `models.{model.name}.input_size` must be set for a "
                              f"{model.role!r} model (the size its tiles are resized to), "
                              "e.g. input_size = [224, 224]")
        return cls(tuple(model.input_size), tuple(model.mean), tuple(model.std),
                   model.channel_order, model.resize, model.decode)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (3, *self.input_size)

    @cached_property
    def affine(self) -> tuple[tuple[int, ...], np.ndarray, np.ndarray]:
        """(source channel, scale, offset) per output channel: x * scale + offset ==
        (x / 255 - mean) / std."""
        src = (2, 1, 0) if self.channel_order == "bgr" else (0, 1, 2)
        mean, std = np.asarray(self.mean, np.float64), np.asarray(self.std, np.float64)
        scale = (1.0 / (255.0 * std)).astype(np.float32)
        offset = (-mean / std).astype(np.float32)
        return src, scale[list(src)], offset[list(src)]


def decode(path: str | Path | io.BytesIO, prep: Preprocessing | None = None) -> np.ndarray:
    """An image file's pixels as (H, W, 3) uint8 RGB, or DescriptorBatchError naming it and what to
    do. JPEG through libjpeg-turbo straight into numpy (simplejpeg: the same pixels as Pillow's
    decode, which bundles the same library, measured faster than Pillow's decode with its array
    copy, CPU the decode threads take from inference; figures in docs/figures.md); anything else,
    or a JPEG simplejpeg refuses (truncated, say), through Pillow, which decodes it or says why it
    cannot. With prep.decode == "scaled" a JPEG at least twice prep's input size on both sides
    comes out of libjpeg-turbo's scaled IDCT (scaled_size), smaller but never below the input."""
    try:
        data = path.getvalue() if isinstance(path, io.BytesIO) else Path(path).read_bytes()
    except FileNotFoundError:
        raise DescriptorBatchError(f"{path}: tile vanished during the build") from None
    except OSError as exc:
        raise DescriptorBatchError(f"{path}: cannot be read ({exc})", _FIX) from None
    size = _plain_jpeg(data) if data.startswith(_JPEG) else None
    if size is not None:
        least = scaled_size(size, prep) if prep is not None and prep.decode == "scaled" else None
        min_h, min_w = least or (0, 0)  # 0: full size
        with contextlib.suppress(ValueError):
            return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=min_h,
                                          min_width=min_w)
    return np.asarray(_pillow_rgb(data, path))


_JPEG = b"\xff\xd8\xff"


def scaled_size(size: tuple[int, int], prep: Preprocessing) -> tuple[int, int] | None:
    """The (H, W) a "scaled" decode of a JPEG of `size` asks libjpeg-turbo for: its largest 1/8,
    1/4 or 1/2 reduction that keeps both sides at least prep's input size (None: full size).
    Powers of two only: its other M/8 reductions run a non-SIMD IDCT, slower than a full decode
    (7/8 of a 256 px tile). The smaller decode replaces most of a large tile's resize, CPU the
    decode threads take from inference (figures in docs/figures.md)."""
    (height, width), (h, w) = size, prep.input_size
    for denom in (8, 4, 2):
        if height >= denom * h and width >= denom * w:
            return -(-height // denom), -(-width // denom)
    return None


def _plain_jpeg(data: bytes) -> tuple[int, int] | None:
    """(H, W) of a YCbCr or grey JPEG within Pillow's decompression-bomb limit, else None. Pillow
    takes the rest: it converts CMYK its own way (simplejpeg's differs by a grey level) and
    refuses an oversized image."""
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    plain = (colorspace in ("YCbCr", "Gray")
             and height * width <= (Image.MAX_IMAGE_PIXELS or height * width))
    return (height, width) if plain else None


def _pillow_rgb(data: bytes, path: str | Path) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img if img.mode == "RGB" else img.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise DescriptorBatchError(f"{path}: not a tile ({exc})", _FIX) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DescriptorBatchError(f"{path}: corrupt, truncated or not an image ({exc})",
                                   _FIX) from None


def open_tile(path: str | Path, prep: Preprocessing | None = None) -> Image.Image:
    """An image file decoded as tiles are (decode, for `prep`'s model), as a PIL image to perturb
    or crop."""
    return Image.fromarray(decode(path, prep), "RGB")


def to_tensor(img: Image.Image | np.ndarray, prep: Preprocessing,
              out: np.ndarray | None = None) -> np.ndarray:
    """One RGB image (PIL, or (H, W, 3) uint8 pixels) resized and normalised into a float32 CHW
    array (into `out` when given)."""
    h, w = prep.input_size
    out = np.empty(prep.shape, np.float32) if out is None else out
    pixels = img if isinstance(img, np.ndarray) else np.asarray(
        img if img.mode == "RGB" else img.convert("RGB"))
    if pixels.shape[:2] != (h, w) and prep.resize in _FILTERS:
        return _resample(pixels, prep, out)
    if pixels.shape[:2] != (h, w):
        pixels = np.asarray(Image.fromarray(pixels, "RGB").resize((w, h), _RESAMPLE[prep.resize]))
    src, scale, offset = prep.affine
    # Two ufunc passes per channel straight from uint8: no float HWC copy, no transpose copy
    # (measured faster than normalising a float image, figure in docs/figures.md; numpy drops the
    # GIL in both loops).
    for c in range(3):
        np.multiply(pixels[..., src[c]], scale[c], out=out[c])
        out[c] += offset[c]
    return out


def load_tensor(path: str | Path, prep: Preprocessing, out: np.ndarray | None = None) -> np.ndarray:
    """Decode and preprocess one image file: the one path both the build and queries take."""
    return to_tensor(decode(path, prep), prep, out)


# Bilinear and area resizes as two batched matmuls (BLAS, GIL released) instead of Pillow's
# resize: Pillow's filter weights and support exactly, in float32 instead of Pillow's 8-bit
# intermediate (within one grey level of it), with the normalisation folded into the weights.
# Resize + normalise of a tile: measured cheaper in CPU than Pillow's resize, CPU the decode
# threads would take from inference on the same cores (bench/embed.py; figures in
# docs/figures.md).
# Filters with negative lobes (bicubic, which Pillow clips at each pass) and nearest stay on
# Pillow.
_FILTERS = {"bilinear": (1.0, lambda x: np.maximum(1.0 - np.abs(x), 0.0)),
            "area": (0.5, lambda x: ((x > -0.5) & (x <= 0.5)).astype(np.float64))}
_SCRATCH_MAX = 16 << 20  # bytes of per-thread float buffers kept between calls (tile-sized images)
_scratch = threading.local()


@dataclass(frozen=True, eq=False)  # one per geometry (lru_cache): compared by identity
class _Axis:
    """One resampling pass: output block b (`group` outputs) is `weights[b]` times the `span`
    inputs starting at b*step - before; the input is zero-padded by `before` and `after`."""

    group: int
    step: int
    before: int
    after: int
    span: int
    weights: np.ndarray  # (blocks, group, span) float32

    @property
    def blocks(self) -> int:
        return len(self.weights)


def _coefficients(src: int, dst: int, resize: str) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's precompute_coeffs (libImaging/Resample.c): first input and weights of each
    output."""
    support, kernel = _FILTERS[resize]
    scale = src / dst
    stretch = max(scale, 1.0)
    support *= stretch
    centre = (np.arange(dst) + 0.5) * scale
    first = np.maximum((centre - support + 0.5).astype(np.int64), 0)
    end = np.minimum((centre + support + 0.5).astype(np.int64), src)
    taps = first[:, None] + np.arange(int((end - first).max()))
    weights = kernel((taps - centre[:, None] + 0.5) / stretch) * (taps < end[:, None])
    total = weights.sum(axis=1, keepdims=True)
    return first, weights / np.where(total == 0.0, 1.0, total)  # as Pillow: all-zero weights stay 0


@functools.lru_cache(maxsize=64)
def _axis(src: int, dst: int, resize: str) -> _Axis:
    """The blocking with the fewest multiply-adds (a BLAS call costs ~64 of them): windows at a
    fixed stride, so a strided view feeds the matmul without gathering."""
    first, weights = _coefficients(src, dst, resize)
    best = None
    for group in range(4, 17):
        blocks = -(-dst // group)
        lo = first[::group]
        hi = np.maximum.reduceat(first + weights.shape[1], np.arange(0, dst, group))
        for step in {max(1, int(group * src / dst)), int(group * src / dst) + 1}:
            start = min(0, int((lo - step * np.arange(blocks)).min()))  # padding is never negative
            span = int((hi - start - step * np.arange(blocks)).max())
            cost = blocks * (group * span + 64)
            if best is None or cost < best[0]:
                best = (cost, group, step, start, span)
    _, group, step, start, span = best
    blocks = -(-dst // group)
    table = np.zeros((blocks, group, span))
    for o in range(dst):
        b, j = divmod(o, group)
        at = first[o] - start - b * step
        table[b, j, at:at + weights.shape[1]] = weights[o]
    after = max(0, start + (blocks - 1) * step + span - src)
    return _Axis(group, step, -start, after, span, table.astype(np.float32))


@functools.lru_cache(maxsize=16)
def _plan(shape: tuple[int, int],
          prep: Preprocessing) -> tuple[_Axis, _Axis, np.ndarray, np.ndarray]:
    """Both passes for one image size, the scale of (x / 255 - mean) / std folded into the first."""
    (h, w), _, scale, _ = (prep.input_size, *prep.affine)
    ay, ax = _axis(shape[0], h, prep.resize), _axis(shape[1], w, prep.resize)
    vertical = scale[:, None, None, None] * ay.weights
    return ay, ax, vertical, np.ascontiguousarray(ax.weights.transpose(0, 2, 1))


class _Kernel:
    """One thread's resize of one geometry: its float buffers and the strided views the two matmuls
    read and write, made once. Fresh buffers cost a page fault per 4 KiB (as much as the resize
    itself) and remaking the views costs a share of it too (as_strided is slow; figure in
    docs/figures.md)."""

    def __init__(self, shape: tuple[int, int], prep: Preprocessing) -> None:
        ay, ax, self.vertical, self.horizontal = _plan(shape, prep)
        (h, w), self.key = prep.input_size, (shape, prep)
        rows, cols = shape[0] + ay.before + ay.after, shape[1] + ax.before + ax.after
        padded = np.zeros((3, rows, cols), np.float32)  # the padding stays 0 (its weights are 0)
        mid = np.empty((3, ay.blocks * ay.group, cols), np.float32)
        res = np.empty((3, ay.blocks * ay.group, ax.blocks * ax.group), np.float32)
        self.nbytes = padded.nbytes + mid.nbytes + res.nbytes
        interior = padded[:, ay.before:ay.before + shape[0], ax.before:ax.before + shape[1]]
        self.interior = interior[::-1] if prep.channel_order == "bgr" else interior
        c, r, k = padded.strides
        self.rows_in = as_strided(padded, (3, ay.blocks, ay.span, cols), (c, ay.step * r, r, k),
                                  writeable=False)
        self.rows_out = mid.reshape(3, ay.blocks, ay.group, -1)
        c, r, k = mid.strides
        self.cols_in = as_strided(mid, (3, ax.blocks, mid.shape[1], ax.span),
                                  (c, ax.step * k, r, k), writeable=False)
        self.cols_out = res.reshape(3, res.shape[1], ax.blocks, ax.group).transpose(0, 2, 1, 3)
        self.crop, self.offset = res[:, :h, :w], prep.affine[2][:, None, None]

    def __call__(self, pixels: np.ndarray, out: np.ndarray) -> np.ndarray:
        np.copyto(self.interior, pixels.transpose(2, 0, 1))
        np.matmul(self.vertical, self.rows_in, out=self.rows_out)
        np.matmul(self.cols_in, self.horizontal, out=self.cols_out)
        return np.add(self.crop, self.offset, out=out)


def _resample(pixels: np.ndarray, prep: Preprocessing, out: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> normalised (3, h, w) float32 `out`: vertical pass, horizontal pass."""
    key = (pixels.shape[:2], prep)
    kernel = getattr(_scratch, "kernel", None)
    if kernel is None or kernel.key != key:
        kernel = _Kernel(key[0], prep)
        if kernel.nbytes <= _SCRATCH_MAX:  # keep tile-sized ones only (a query frame may be huge)
            _scratch.kernel = kernel
    return kernel(pixels, out)
