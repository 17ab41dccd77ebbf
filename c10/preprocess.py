"""Per-model tile preprocessing, applied identically at build and at query time."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from c10.errors import DescriptorBatchError

_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
             "nearest": Image.NEAREST, "area": Image.BOX}


@dataclass(frozen=True)
class Preprocessing:
    input_size: tuple[int, int]  # (H, W)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channel_order: str = "rgb"
    resize: str = "bilinear"

    @classmethod
    def from_model(cls, model) -> "Preprocessing":
        return cls(tuple(model.input_size), tuple(model.mean), tuple(model.std),
                   model.channel_order, model.resize)


def open_tile(path: str | Path) -> Image.Image:
    """Decode a tile fully to RGB, or raise DescriptorBatchError naming it."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except FileNotFoundError:
        raise DescriptorBatchError(f"{path}: tile vanished during the build; re-run `doit build_cache`") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DescriptorBatchError(
            f"{path}: not a readable image ({exc}); re-download or delete this tile, "
            "then re-run `doit build_cache`") from None


def to_tensor(img: Image.Image, prep: Preprocessing) -> np.ndarray:
    """Resize, normalise and lay out one image as a float32 CHW array."""
    h, w = prep.input_size
    if img.size != (w, h):
        img = img.resize((w, h), _RESAMPLE[prep.resize])
    arr = np.asarray(img, dtype=np.float32) * (1.0 / 255.0)
    arr = (arr - np.asarray(prep.mean, np.float32)) / np.asarray(prep.std, np.float32)
    if prep.channel_order == "bgr":
        arr = arr[..., ::-1]
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def load_tensor(path: str | Path, prep: Preprocessing) -> np.ndarray:
    """Decode and preprocess one tile file."""
    return to_tensor(open_tile(path), prep)
