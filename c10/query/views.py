"""Camera-frame-like views of tiles (rotated crop, light, noise, blur) for the selftests."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageFilter

from c10.errors import ConfigError

PERTURB = {
    "mild": {"keep": 0.85, "degrees": 5.0, "swing": 0.10, "noise": 0.0, "blur": 0.0},
    "strong": {"keep": 0.65, "degrees": 15.0, "swing": 0.25, "noise": 5.0, "blur": 1.0},
}


def perturb(img: Image.Image, rng: np.random.Generator, strength: str = "mild") -> Image.Image:
    """A camera-frame-like view of `img`: rotated crop resized back, photometric change, noise."""
    if strength not in PERTURB:
        raise ConfigError(f"perturb strength {strength!r} is not one of {sorted(PERTURB)}")
    p = PERTURB[strength]
    out = _rotated_crop(img.convert("RGB"), rng, p["keep"], p["degrees"])
    arr = np.asarray(out, dtype=np.float32)
    gain, contrast = 1 + rng.uniform(-p["swing"], p["swing"], size=2)
    mean = arr.mean(axis=(0, 1))
    arr = (arr - mean) * contrast + mean * gain
    if p["noise"]:
        arr = arr + rng.normal(0.0, rng.uniform(0, p["noise"]), arr.shape)
    out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    if p["blur"]:
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0, p["blur"])))
    return out


def _rotated_crop(img: Image.Image, rng: np.random.Generator, keep: float,
                  degrees: float) -> Image.Image:
    """Sample a rotated square inside the image (no empty corners) and resample it to full size."""
    w, h = img.size
    theta = math.radians(rng.uniform(-degrees, degrees))
    cos, sin = math.cos(theta), math.sin(theta)
    # The rotated crop's bounding box must fit: side * (|cos| + |sin|) <= image side.
    side = min(rng.uniform(keep, 1.0), 1.0 / (abs(cos) + abs(sin))) * min(w, h)
    half = side * (abs(cos) + abs(sin)) / 2
    cx, cy = rng.uniform(half, w - half), rng.uniform(half, h - half)
    s = side / w
    # Output (u, v) -> input: centre + R(theta) * s * ((u, v) - output centre).
    a, b, d, e = s * cos, -s * sin, s * sin, s * cos
    c = cx - a * w / 2 - b * h / 2
    f = cy - d * w / 2 - e * h / 2
    return img.transform((w, h), Image.Transform.AFFINE, (a, b, c, d, e, f),
                         Image.Resampling.BILINEAR)
