"""Image output: model range [-1, 1] -> uint8, grids, PNGs with their generation parameters."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, PngImagePlugin

from .files import as_utf8, atomic_output


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Images in [-1, 1], float [N, C, H, W] -> uint8 [N, H, W, C]."""
    x = np.clip((x + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def grid_shape(n: int, h: int, w: int, c: int, ncols: int | None = None, pad: int = 2) -> tuple[int, int, int]:
    """[rows*(H+pad)+pad, cols*(W+pad)+pad, C] for n images of H x W, ncols per row (default: square-ish)."""
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    return (nrows * (h + pad) + pad, ncols * (w + pad) + pad, c)


def grid_memory(n: int, h: int, w: int, c: int) -> int:
    """Bytes a grid of n images holds at most: the uint8 canvas, plus the copy Pillow makes to encode it
    (4 bytes per pixel for RGB), plus the canvas again for the encoder's buffers."""
    rows, cols, c = grid_shape(n, h, w, c)
    return rows * cols * (2 * c + 4)


def new_grid(n: int, h: int, w: int, c: int, ncols: int | None = None, pad: int = 2) -> np.ndarray:
    """A white uint8 canvas (`grid_shape`) for n images of H x W; fill it with `paste_into_grid`."""
    return np.full(grid_shape(n, h, w, c, ncols, pad), 255, np.uint8)


def paste_into_grid(grid: np.ndarray, k: int, image: np.ndarray, pad: int = 2) -> None:
    """Write uint8 image [H, W, C] into cell k (row-major) of a canvas from `new_grid`."""
    h, w = image.shape[:2]
    ncols = (grid.shape[1] - pad) // (w + pad)
    r, col = divmod(k, ncols)
    grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = image


def make_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 [N, H, W, C] -> one uint8 [rows*(H+pad)+pad, cols*(W+pad)+pad, C] image on white."""
    n, h, w, c = images.shape
    grid = new_grid(n, h, w, c, ncols, pad)
    for k, img in enumerate(images):
        paste_into_grid(grid, k, img, pad)
    return grid


def save_png(path, image: np.ndarray, text: dict[str, str] | None = None) -> None:
    """Write uint8 [H, W, C] (C = 1 .. 4) as a PNG atomically, with `text` as tEXt chunks."""
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, as_utf8(str(value)))
    with atomic_output(path) as f:
        write_png(f, image, info)


def write_png(f, image: np.ndarray, info: PngImagePlugin.PngInfo | None = None) -> None:
    """Encode uint8 [H, W, C] (C = 1 .. 4) as PNG into the open binary file `f`."""
    if image.ndim == 3 and image.shape[2] == 1:  # one channel: a grey PNG ("L"); 2, 3, 4 are LA, RGB, RGBA
        image = image[:, :, 0]
    Image.fromarray(image).save(f, format="PNG", pnginfo=info)
