"""Evaluation numbers that need no torch: how visible patch borders are, and the distances between feature sets
(KID, FD) that sample quality is measured with."""
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


LOCAL_SEAM_REACH = 3  # the local seam score compares a border with the lines 1..3 px beside it


def local_seam_score(images: np.ndarray, grid: int) -> float:
    """Mean |intensity step| across the patch borders / mean |step| across the lines 1 to LOCAL_SEAM_REACH
    pixels beside them (on both sides, the same direction; lines that are borders themselves left out).

    images: uint8 or float [N, H, W, C]. About 1.0 where a border looks like its own neighbourhood, what real
    images score; a quilt of independent patches scores far above 1. Unlike `seam_score`, which divides by
    the step everywhere else, a model that paints smooth insides (a low denominator far from the borders)
    is not counted as seamy: only the neighbourhood of each border is compared.
    """
    x = np.asarray(images, dtype=np.float64)
    n, h, w, c = x.shape
    border, beside = [], []
    for axis, size in ((2, w), (1, h)):  # steps between columns, then between rows
        steps = np.abs(np.diff(x, axis=axis)).mean(axis=(0, 3))  # [H, W-1] or [H-1, W]: mean over images, channels
        lines = steps if axis == 2 else steps.T  # [other side, line]: line j is the step from j to j + 1
        borders = [k * size // grid - 1 for k in range(1, grid)]
        for j in borders:
            border.append(lines[:, j].mean())
            near = [j + d for d in range(-LOCAL_SEAM_REACH, LOCAL_SEAM_REACH + 1)
                    if d and 0 <= j + d < size - 1 and j + d not in borders]
            beside.append(lines[:, near].mean())
    return float(np.mean(border) / max(np.mean(beside), 1e-12))


def seam_score(images: np.ndarray, grid: int) -> float:
    """Mean |intensity step| across patch borders / mean |step| between other neighbouring pixels: the global
    seam score, kept beside `local_seam_score` (which the training logs report) for comparison with earlier
    results.

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


def kid(a: np.ndarray, b: np.ndarray) -> float:
    """Kernel Inception Distance (Binkowski et al. 2018) between feature sets a [m, d] and b [n, d]: the unbiased
    MMD^2 with the polynomial kernel k(x, y) = (x.y / d + 1)^3, the mean kernel within each set over pairs
    i != j minus twice the mean across the sets. Needs m, n >= 2; may come out slightly negative."""
    d = a.shape[1]
    k_aa, k_bb, k_ab = ((a @ a.T) / d + 1) ** 3, ((b @ b.T) / d + 1) ** 3, ((a @ b.T) / d + 1) ** 3
    m, n = len(a), len(b)
    return float((k_aa.sum() - k_aa.trace()) / (m * (m - 1)) + (k_bb.sum() - k_bb.trace()) / (n * (n - 1))
                 - 2 * k_ab.mean())


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets a [N, d], b [M, d] (sample covariances):
    ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), the trace of the root from eigenvalues (FID's
    formula, Heusel et al. 2017). On EfficientNet-Lite0 features this is the FD-EffNet of the tables."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ s_b @ root_a), 0, None)).sum()  # Tr (S_a^1/2 S_b S_a^1/2)^1/2
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * cross)


def paired_kid_ratio(a: np.ndarray, b: np.ndarray, real: np.ndarray, rounds: int = 100,
                     seed: int = 0) -> tuple[float, float, float]:
    """(median, 5th, 95th percentile) of kid(a_S, real_R) / kid(b_S, real_R) over `rounds` random half-size
    subsets: S of the sample indices (the same rows of a [N, d] and b [N, d], so samples drawn from the same
    noise are compared) and R of real [M, d]. Pairing makes the ratio far steadier than two independent KIDs;
    the spread says how far it can be trusted. Needs N and M of at least 4, and b's KIDs above 0."""
    if len(a) != len(b) or min(len(a), len(real)) < 4:
        raise ValueError(f"need paired sets of at least 4 samples and 4 real, got {len(a)}, {len(b)}, {len(real)}")
    rng = np.random.default_rng(seed)
    ratios = []
    for _ in range(rounds):
        s = rng.choice(len(a), len(a) // 2, replace=False)
        r = rng.choice(len(real), len(real) // 2, replace=False)
        ratios.append(kid(a[s], real[r]) / kid(b[s], real[r]))
    return float(np.median(ratios)), float(np.percentile(ratios, 5)), float(np.percentile(ratios, 95))
