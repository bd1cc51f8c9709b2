"""Evaluation numbers that need no torch: how visible patch borders are."""
from __future__ import annotations

import numpy as np


def seam_grid(grid: int, compared_with: int = 2) -> int:
    """The grid whose borders are scored: a patch model's own; a 1x1 model's at the borders of the patch grid
    it is the baseline for (`compared_with`), 2x2 at least."""
    return grid if grid > 1 else max(compared_with, 2)


def _steps(images: np.ndarray, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean |intensity step| per neighbouring-pixel pair, split into (across patch borders, everywhere else)."""
    x = np.asarray(images, dtype=np.float64)
    n, h, w, c = x.shape
    dx = np.abs(np.diff(x, axis=2)).mean(axis=(0, 3))  # [H, W-1]: step between columns j and j+1
    dy = np.abs(np.diff(x, axis=1)).mean(axis=(0, 3))  # [H-1, W]
    col_border = np.zeros(w - 1, bool)
    col_border[[k * w // grid - 1 for k in range(1, grid)]] = True
    row_border = np.zeros(h - 1, bool)
    row_border[[k * h // grid - 1 for k in range(1, grid)]] = True
    border = np.concatenate([dx[:, col_border].ravel(), dy[row_border, :].ravel()])
    inside = np.concatenate([dx[:, ~col_border].ravel(), dy[~row_border, :].ravel()])
    return border, inside


def seam_score(images: np.ndarray, grid: int) -> float:
    """Mean |intensity step| across patch borders / mean |step| between other neighbouring pixels.

    images: uint8 or float [N, H, W, C]. 1.0 means borders look like any other pixel pair; a quilt
    of independent patches scores far above 1. Compare with real images' score at the same positions.
    """
    border, inside = _steps(images, grid)
    return float(border.mean() / max(inside.mean(), 1e-12))


def border_step(images: np.ndarray, grid: int) -> float:
    """Mean |intensity step| across patch borders, in the images' own units (0-255 for uint8).

    The seam score's numerator alone: on flat (e.g. white) backgrounds the inside steps are tiny and
    inflate the ratio, so this absolute number goes beside it.
    """
    return float(_steps(images, grid)[0].mean())
