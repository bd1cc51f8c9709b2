"""Evaluation numbers that need no torch: the seam score of patch borders."""
from __future__ import annotations

import numpy as np


def seam_score(images: np.ndarray, grid: int) -> float:
    """Mean |intensity step| across patch borders / mean |step| between other neighbouring pixels.

    images: uint8 or float [N, H, W, C]. 1.0 means borders look like any other pixel pair; a quilt
    of independent patches scores far above 1. Compare with real images' score at the same positions.
    """
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
    return float(border.mean() / max(inside.mean(), 1e-12))
