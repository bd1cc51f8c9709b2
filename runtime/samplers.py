"""Samplers: small pure functions over an explicit array of timesteps.

`denoise(x, t) -> x0_hat` is any callable that maps a batch of full noisy images
x_t (float32 [N, C, H, W]) at timestep index t to the estimate of the clean
images; the patch loop (`patchgen.runtime.loop`) builds one from a single-patch
network. `rngs` holds one numpy Generator per image, so an image's noise never
depends on which other images share the batch.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np

Denoiser = Callable[[np.ndarray, int], np.ndarray]
# project(x_s, abar_s): called in place on x_s right after each step reaches the noise level abar_s (1.0 after the
# last step). Inpainting puts the known pixels back there, noised to that level (`loop.sample_images`).
Projection = Callable[[np.ndarray, float], None]


def image_rngs(seed: int, first_index: int, count: int) -> list[np.random.Generator]:
    """One generator per image, derived from (seed, image index) only."""
    return [np.random.default_rng([seed, i]) for i in range(first_index, first_index + count)]


def normal_like(rngs: Sequence[np.random.Generator], shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal float32 [len(rngs), *shape], each row from its own image's generator."""
    out = np.empty((len(rngs), *shape), dtype=np.float32)
    for row, rng in zip(out, rngs):
        rng.standard_normal(out=row, dtype=np.float32)
    return out


def eps_from_x0(x: np.ndarray, x0: np.ndarray, abar_t: float) -> np.ndarray:
    """Noise implied by x0 at level abar_t: eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""
    return (x - math.sqrt(abar_t) * x0) / math.sqrt(1.0 - abar_t)


def sample_ddim(denoise: Denoiser, x: np.ndarray, timesteps: np.ndarray, alphas_cumprod: np.ndarray,
                rngs: Sequence[np.random.Generator], eta: float = 0.0, callback=None,
                project: Optional[Projection] = None, jumps: int = 0) -> np.ndarray:
    """DDIM (Song et al. 2021, eq. 12) from x = x_T along `timesteps` (descending); eta=0 is deterministic.

    jumps (with `project`, inpainting): RePaint's resampling (Lugmayr et al. 2022, Alg. 1, jump length 1):
    each step is taken jumps + 1 times; between two, x_s goes back to level t with fresh noise,
    x_t = sqrt(abar_t / abar_s) x_s + sqrt(1 - abar_t / abar_s) z, so the painted pixels settle with the
    kept ones. It costs jumps + 1 times the network calls."""
    for i, t in enumerate(timesteps):
        t = int(t)
        abar_t = float(alphas_cumprod[t])
        abar_s = float(alphas_cumprod[timesteps[i + 1]]) if i + 1 < len(timesteps) else 1.0
        # sigma_t(eta) = eta * sqrt((1 - abar_s) / (1 - abar_t)) * sqrt(1 - abar_t / abar_s)
        sigma = eta * math.sqrt((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s))
        for jump in range(jumps + 1):
            if jump:  # RePaint: back from s to t, q(x_t | x_s)
                x = math.sqrt(abar_t / abar_s) * x + math.sqrt(1 - abar_t / abar_s) * normal_like(rngs, x.shape[1:])
            x0 = denoise(x, t)
            eps = eps_from_x0(x, x0, abar_t)
            # x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s - sigma^2) eps + sigma z
            x = math.sqrt(abar_s) * x0 + math.sqrt(max(1 - abar_s - sigma**2, 0.0)) * eps
            if sigma > 0:
                x += sigma * normal_like(rngs, x.shape[1:])
            if project is not None:
                project(x, abar_s)
        if callback is not None:
            callback(i, t)
    return x


def sample_ddpm(denoise: Denoiser, x: np.ndarray, timesteps: np.ndarray, alphas_cumprod: np.ndarray,
                rngs: Sequence[np.random.Generator], callback=None, project: Optional[Projection] = None,
                jumps: int = 0) -> np.ndarray:
    """Ancestral DDPM (Ho et al. 2020), on all T steps or a strided subset.

    DDIM with eta = 1 has exactly the DDPM posterior q(x_s | x_t, x0): mean
    sqrt(abar_s) beta'/(1-abar_t) x0 + sqrt(alpha')(1-abar_s)/(1-abar_t) x_t and
    variance beta'(1-abar_s)/(1-abar_t), with alpha' = abar_t/abar_s = 1 - beta'
    (Song et al. 2021, sec. 4.1), so one step function serves both.
    """
    return sample_ddim(denoise, x, timesteps, alphas_cumprod, rngs, eta=1.0, callback=callback, project=project,
                       jumps=jumps)


def sample_dpmpp_2m(denoise: Denoiser, x: np.ndarray, timesteps: np.ndarray, alphas_cumprod: np.ndarray,
                    rngs: Sequence[np.random.Generator] = (), callback=None,
                    project: Optional[Projection] = None) -> np.ndarray:
    """DPM-Solver++(2M) (Lu et al. 2022, multistep, data prediction): deterministic, ~20 steps.

    With alpha = sqrt(abar), sigma = sqrt(1 - abar), lambda = log(alpha / sigma) and h = lambda_next - lambda:
    x_next = (sigma_next / sigma) x - alpha_next (e^{-h} - 1) D, where D is x0_hat on the first step and
    the second-order extrapolation (1 + 1/(2r)) x0_hat - 1/(2r) x0_hat_prev, r = h_prev / h, after it.
    The last step (to abar = 1) returns D's first-order limit, x0_hat.
    """
    def lam(abar: float) -> float:
        return 0.5 * math.log(abar / (1.0 - abar))

    x0_prev, h_prev = None, None
    for i, t in enumerate(timesteps):
        t = int(t)
        x0 = denoise(x, t)
        if i + 1 == len(timesteps):
            x, abar_n = x0, 1.0
        else:
            abar_t, abar_n = float(alphas_cumprod[t]), float(alphas_cumprod[timesteps[i + 1]])
            h = lam(abar_n) - lam(abar_t)
            d = x0
            if x0_prev is not None:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            # x_next = (sigma_n / sigma_t) x - alpha_n (e^{-h} - 1) D
            x = math.sqrt((1 - abar_n) / (1 - abar_t)) * x - math.sqrt(abar_n) * math.expm1(-h) * d
            x0_prev, h_prev = x0, h
        if project is not None:
            project(x, abar_n)
        if callback is not None:
            callback(i, t)
    return x
