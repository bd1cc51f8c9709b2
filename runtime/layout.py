"""Patch layout and conditioning inputs shared by training and the runtime.

Each function works on numpy arrays and on torch tensors alike (reshape,
permute, mean, slicing; windows use each library's strided view), so both
sides run the one copy.
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


def pad_image(x, halo: int, out=None):
    """(..., C, H, W) -> (..., C, H+2M, W+2M): x with M = `halo` zero pixels on every side.

    out: a zeroed buffer of the padded shape to reuse (numpy or torch). Only its centre is written, so a
    buffer that is padded into step after step keeps its zero border and is never allocated again."""
    *lead, c, h, w = x.shape
    if out is None:
        shape = (*lead, c, h + 2 * halo, w + 2 * halo)
        out = x.new_zeros(shape) if hasattr(x, "new_zeros") else np.zeros(shape, x.dtype)
    out[..., halo:halo + h, halo:halo + w] = x
    return out


def window_view(padded, grid: int, halo: int):
    """(..., C, H+2M, W+2M) -> (..., G, G, C, P+2M, P+2M): window (i, j) = padded[..., iP : iP+P+2M, jP : jP+P+2M],
    i.e. patch (i, j) of the unpadded image with M pixels of its neighbours (or of the zero pad) on each side.

    A strided view, no copy (numpy: read-only). With halo 0 it equals `patch_view`. The overlap-tile input
    of Ronneberger et al. (2015), cut per patch as in Arakawa et al. (2023) Sec. 3 with a halo added."""
    *lead, c, hp, wp = padded.shape
    h, w = hp - 2 * halo, wp - 2 * halo
    if h <= 0 or w <= 0 or h % grid or w % grid:
        raise ValueError(f"grid {grid} does not divide the image size {h}x{w} inside a halo of {halo}")
    ph, pw = h // grid, w // grid
    k = len(lead)
    if hasattr(padded, "unfold"):  # torch: (..., C, Gi, Gj, rows, cols)
        win = padded.unfold(k + 1, ph + 2 * halo, ph).unfold(k + 2, pw + 2 * halo, pw)
    else:  # numpy: every (P+2M)^2 window, then every P-th one: (..., C, Gi, Gj, rows, cols)
        win = np.lib.stride_tricks.sliding_window_view(padded, (ph + 2 * halo, pw + 2 * halo), axis=(-2, -1))
        win = win[..., ::ph, ::pw, :, :]
    return _permute(win, (*range(k), k + 1, k + 2, k, k + 3, k + 4))


def to_windows(x, grid: int, halo: int):
    """(..., C, H, W) -> (..., G*G, C, P+2M, P+2M): each patch's window, zero-padded at the image's edges, in
    row-major order like `to_patches` (a copy; halo 0: `to_patches`)."""
    if halo == 0:
        return to_patches(x, grid)
    v = window_view(pad_image(x, halo), grid, halo)
    return v.reshape(*v.shape[:-5], grid * grid, *v.shape[-3:])


def crop_centre(x, halo: int):
    """(..., P+2M, P+2M) -> (..., P, P): the patch inside its window (a view)."""
    if halo == 0:
        return x
    return x[..., halo:-halo, halo:-halo]


def pool_gcc(x, patch_size: int):
    """Global Content Conditioning: (..., C, H, W) average-pooled to (..., C, P, P), an exact block mean."""
    *lead, c, h, w = x.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"patch size {patch_size} does not divide the image size {h}x{w}")
    # Output pixel (a, b) is the mean of the (H/P) x (W/P) block it covers.
    x = x.reshape(*lead, c, patch_size, h // patch_size, patch_size, w // patch_size)
    return x.mean(axis=(-3, -1))


def position_onehot(grid: int, positions=None, out=None) -> np.ndarray:
    """One-hot position vectors, float32 [B, G*G]: row b is 1 at positions[b] (patch k = i*G + j) and 0
    elsewhere; every position in order (the G*G identity) when `positions` is None. Only the rows asked
    for are built (G*G floats each, never G^4). `out`: a float32 [>= B, G*G] buffer to fill instead."""
    g2 = grid * grid
    positions = np.arange(g2) if positions is None else np.asarray(positions)
    rows = np.zeros((len(positions), g2), np.float32) if out is None else out[:len(positions)]
    rows.fill(0)
    rows[np.arange(len(positions)), positions] = 1
    return rows
