"""Per-model tile preprocessing, applied by the same code at build and at query time."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from c10.errors import ConfigError, DescriptorBatchError

_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
             "nearest": Image.NEAREST, "area": Image.BOX}
_NEXT = "re-download or delete this tile, then run `doit build_cache` again"


@dataclass(frozen=True)
class Preprocessing:
    """Resize to input_size, scale to [0, 1], subtract mean, divide by std (both in RGB), lay out CHW."""

    input_size: tuple[int, int]  # (H, W)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channel_order: str = "rgb"
    resize: str = "bilinear"

    @classmethod
    def from_model(cls, model) -> "Preprocessing":
        if not model.input_size:
            raise ConfigError(f"c10.toml `models.{model.name}.input_size` must be set for a {model.role!r} "
                              "model (the size its tiles are resized to), e.g. input_size = [224, 224]")
        return cls(tuple(model.input_size), tuple(model.mean), tuple(model.std),
                   model.channel_order, model.resize)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (3, *self.input_size)

    @cached_property
    def affine(self) -> tuple[tuple[int, ...], np.ndarray, np.ndarray]:
        """(source channel, scale, offset) per output channel: x * scale + offset == (x / 255 - mean) / std."""
        src = (2, 1, 0) if self.channel_order == "bgr" else (0, 1, 2)
        mean, std = np.asarray(self.mean, np.float64), np.asarray(self.std, np.float64)
        scale = (1.0 / (255.0 * std)).astype(np.float32)
        offset = (-mean / std).astype(np.float32)
        return src, scale[list(src)], offset[list(src)]


def open_tile(path: str | Path) -> Image.Image:
    """Decode an image file fully to RGB, or raise DescriptorBatchError naming it and what to do."""
    try:
        with Image.open(path) as img:
            img.load()
            return img if img.mode == "RGB" else img.convert("RGB")
    except FileNotFoundError:
        raise DescriptorBatchError(f"{path}: tile vanished during the build; run `doit build_cache` again") from None
    except Image.DecompressionBombError as exc:
        raise DescriptorBatchError(f"{path}: not a tile ({exc}); {_NEXT}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DescriptorBatchError(f"{path}: corrupt, truncated or not an image ({exc}); {_NEXT}") from None


def to_tensor(img: Image.Image, prep: Preprocessing, out: np.ndarray | None = None) -> np.ndarray:
    """One RGB image resized and normalised into a float32 CHW array (into `out` when given)."""
    h, w = prep.input_size
    if img.size != (w, h):
        img = img.resize((w, h), _RESAMPLE[prep.resize])
    pixels = np.asarray(img.convert("RGB") if img.mode != "RGB" else img)
    out = np.empty(prep.shape, np.float32) if out is None else out
    src, scale, offset = prep.affine
    # Two ufunc passes per channel straight from uint8: no float HWC copy, no transpose copy
    # (4x faster than normalising a float image; numpy drops the GIL in both loops).
    for c in range(3):
        np.multiply(pixels[..., src[c]], scale[c], out=out[c])
        out[c] += offset[c]
    return out


def load_tensor(path: str | Path, prep: Preprocessing, out: np.ndarray | None = None) -> np.ndarray:
    """Decode and preprocess one image file: the one path both the build and queries take."""
    return to_tensor(open_tile(path), prep, out)
