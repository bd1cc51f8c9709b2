"""Samplers against their equations, with exact denoisers."""
import math

import numpy as np
import pytest

from patchgen.runtime.samplers import (eps_from_x0, image_rngs, normal_like, sample_ddim, sample_ddpm,
                                       sample_dpmpp_2m)
from patchgen.runtime.schedule import Schedule, alphas_cumprod, timestep_sequence

ABAR = alphas_cumprod(Schedule())


def oracle(x0):
    """A perfect denoiser for a single known image."""
    return lambda x, t: np.broadcast_to(x0, x.shape).astype(np.float32)


@pytest.mark.quick
@pytest.mark.parametrize("sampler", [sample_ddim, sample_dpmpp_2m])
def test_deterministic_samplers_recover_the_data_with_a_perfect_denoiser(sampler):
    x0 = np.random.default_rng(0).uniform(-1, 1, (1, 3, 4, 4)).astype(np.float32)
    rngs = image_rngs(0, 0, 1)
    out = sampler(oracle(x0), normal_like(rngs, (3, 4, 4)), timestep_sequence(1000, 10), ABAR, rngs)
    np.testing.assert_allclose(out, x0, atol=1e-5)


@pytest.mark.quick
def test_ddpm_step_is_the_posterior():
    """A strided DDPM step t -> s draws mean + std * z of q(x_s | x_t, x0) (Ho et al. 2020, eqs. 6-7)."""
    t, s = 600, 550
    x0 = np.full((1, 1, 2, 2), 0.3, np.float32)
    x_t = np.random.default_rng(1).standard_normal((1, 1, 2, 2)).astype(np.float32)
    seen = {}

    def spy(x, step):
        seen[step] = x.copy()
        return oracle(x0)(x, step)
    sample_ddpm(spy, x_t, np.array([t, s]), ABAR, image_rngs(7, 0, 1))
    z = normal_like(image_rngs(7, 0, 1), (1, 2, 2))  # the first noise that image's generator draws
    a_t, a_s = ABAR[t], ABAR[s]
    beta = 1 - a_t / a_s
    mean = math.sqrt(a_s) * beta / (1 - a_t) * x0 + math.sqrt(1 - beta) * (1 - a_s) / (1 - a_t) * x_t
    std = math.sqrt(beta * (1 - a_s) / (1 - a_t))
    np.testing.assert_allclose(seen[s], mean + std * z, atol=1e-5)


@pytest.mark.quick
def test_eps_from_x0_inverts_the_forward_process():
    x0, eps = np.float32(0.25), np.float32(-1.5)
    a = ABAR[300]
    x_t = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
    assert eps_from_x0(np.float32(x_t), x0, a) == pytest.approx(eps, abs=1e-5)


@pytest.mark.quick
def test_per_image_noise_does_not_depend_on_batching():
    together = normal_like(image_rngs(3, 0, 4), (2, 2))
    apart = np.concatenate([normal_like(image_rngs(3, i, 1), (2, 2)) for i in range(4)])
    np.testing.assert_array_equal(together, apart)


@pytest.mark.parametrize("T", [100, 1000])
def test_every_step_count_of_every_sampler_reaches_the_data(T):
    """--steps N works for every N from 1 to T: with a perfect denoiser each sampler lands on x0 (DDPM within
    its last step's noise), finite, and calls the denoiser exactly N times at timesteps inside [0, T)."""
    abar = alphas_cumprod(Schedule(num_timesteps=T))
    x0 = np.random.default_rng(0).uniform(-1, 1, (1, 1, 2, 2)).astype(np.float32)
    seen = []

    def denoise(x, t):
        assert 0 <= t < T
        seen.append(t)
        return oracle(x0)(x, t)
    for steps in range(1, T + 1, 1 if T <= 100 else 7):
        for sampler in (sample_ddim, sample_dpmpp_2m, sample_ddpm):
            seen.clear()
            rngs = image_rngs(0, 0, 1)
            out = sampler(denoise, normal_like(rngs, (1, 2, 2)), timestep_sequence(T, steps), abar, rngs)
            assert len(seen) == steps and np.all(np.isfinite(out))
            np.testing.assert_allclose(out, x0, atol=1e-4)
