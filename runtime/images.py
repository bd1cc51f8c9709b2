"""Image output: model range [-1, 1] -> uint8, grids, PNGs with their generation parameters."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, PngImagePlugin

from .files import atomic_output


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Images in [-1, 1], float [N, C, H, W] -> uint8 [N, H, W, C]."""
    x = np.clip((x + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def make_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 [N, H, W, C] -> one uint8 [rows*(H+pad)+pad, cols*(W+pad)+pad, C] image on white."""
    n, h, w, c = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
    for k, img in enumerate(images):
        r, col = divmod(k, ncols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = img
    return grid


def save_png(path, image: np.ndarray, text: dict[str, str] | None = None) -> None:
    """Write uint8 [H, W, C] as a PNG atomically, with `text` as tEXt chunks."""
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, str(value))
    with atomic_output(path) as f:
        Image.fromarray(image).save(f, format="PNG", pnginfo=info)
