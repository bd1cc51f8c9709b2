"""Patch layout and conditioning inputs shared by training and the runtime.

Each function works on numpy arrays and on torch tensors alike (only reshape,
permute and mean are used), so both sides run the one copy.
"""
from __future__ import annotations

import numpy as np


def _permute(x, axes):
    # numpy spells a full permutation `transpose(axes)`, torch `permute(*axes)`.
    return x.permute(*axes) if hasattr(x, "permute") else x.transpose(axes)


def _lead(x, n: int):
    return tuple(x.shape[: x.ndim - n])


def patch_view(x, grid: int):
    """(..., C, H, W) -> (..., G, G, C, P, P): patch (i, j) at [..., i, j]. A view for contiguous numpy input,
    so writing into it writes into x."""
    *lead, c, h, w = x.shape
    if h % grid or w % grid:
        raise ValueError(f"grid {grid} does not divide the image size {h}x{w}")
    k = len(lead)
    x = x.reshape(*lead, c, grid, h // grid, grid, w // grid)
    # (..., C, Gi, Pi, Gj, Pj) -> (..., Gi, Gj, C, Pi, Pj)
    return _permute(x, (*range(k), k + 1, k + 3, k, k + 2, k + 4))


def to_patches(x, grid: int):
    """(..., C, H, W) -> (..., G*G, C, P, P), patches in row-major order (index i*G + j)."""
    v = patch_view(x, grid)
    return v.reshape(*v.shape[:-5], grid * grid, *v.shape[-3:])


def from_patches(p, grid: int):
    """Inverse of `to_patches`: (..., G*G, C, P, P) -> (..., C, H, W)."""
    *lead, n, c, ph, pw = p.shape
    if n != grid * grid:
        raise ValueError(f"expected {grid * grid} patches for grid {grid}, got {n}")
    k = len(lead)
    p = p.reshape(*lead, grid, grid, c, ph, pw)
    # (..., Gi, Gj, C, Pi, Pj) -> (..., C, Gi, Pi, Gj, Pj)
    p = _permute(p, (*range(k), k + 2, k, k + 3, k + 1, k + 4))
    return p.reshape(*lead, c, grid * ph, grid * pw)


def pool_gcc(x, patch_size: int):
    """Global Content Conditioning: (..., C, H, W) average-pooled to (..., C, P, P), an exact block mean."""
    *lead, c, h, w = x.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"patch size {patch_size} does not divide the image size {h}x{w}")
    # Output pixel (a, b) is the mean of the (H/P) x (W/P) block it covers.
    x = x.reshape(*lead, c, patch_size, h // patch_size, patch_size, w // patch_size)
    return x.mean(axis=(-3, -1))


def position_onehot(grid: int) -> np.ndarray:
    """One-hot position vectors, float32 [G*G, G*G]: row k is patch k = i*G + j."""
    return np.eye(grid * grid, dtype=np.float32)
