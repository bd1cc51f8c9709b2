"""The float64 schedule: pinned values (Nichol & Dhariwal cosine, Ho et al. linear) and timestep spacing."""
import numpy as np
import pytest

from patchgen.runtime.schedule import (MAX_TERMINAL_SIGNAL, Schedule, alphas_cumprod, betas, min_timesteps,
                                       timestep_sequence)


@pytest.mark.quick
def test_cosine_schedule_pinned():
    abar = alphas_cumprod(Schedule())
    assert abar.dtype == np.float64 and abar.shape == (1000,)
    assert abar[0] == pytest.approx(0.999958715775178, abs=1e-12)
    assert abar[499] == pytest.approx(0.4938435904406382, abs=1e-12)
    assert abar[-1] == pytest.approx(2.4287669070348567e-09, rel=1e-9)
    assert np.all(np.diff(abar) < 0)
    assert betas(Schedule()).max() <= 0.999


@pytest.mark.quick
def test_linear_schedule_pinned():
    assert (Schedule(kind="linear").beta_start, Schedule(kind="linear").beta_end) == (1e-4, 0.02)
    abar = alphas_cumprod(Schedule(kind="linear"))
    assert abar[0] == pytest.approx(0.9999, abs=1e-12)
    assert abar[-1] == pytest.approx(4.035829765375676e-05, rel=1e-9)


@pytest.mark.quick
def test_schedule_is_read_only():
    with pytest.raises(ValueError):
        alphas_cumprod(Schedule())[0] = 1.0


@pytest.mark.parametrize("T", range(1, 301))
def test_timestep_sequence_for_every_step_count(T):
    """For every T and 1 <= steps <= T: exactly `steps` distinct timesteps, strictly descending from T-1, in [0, T-1]."""
    for steps in range(1, T + 1):
        ts = timestep_sequence(T, steps)
        assert ts.dtype == np.int64 and len(ts) == steps and ts[0] == T - 1 and ts[-1] >= 0
        assert np.all(np.diff(ts) < 0)


@pytest.mark.quick
@pytest.mark.parametrize("T,steps", [(1000, s) for s in (61, 103, 121, 122, 201, 206, 999)]
                         + [(100, s) for s in (29, 31, 58, 62, 97)] + [(4000, 3999), (1000, 1)])
def test_timestep_sequence_reported_step_counts(T, steps):
    ts = timestep_sequence(T, steps)
    assert len(ts) == steps and len(set(ts)) == steps and ts[0] == T - 1 and ts.min() >= 0


@pytest.mark.quick
@pytest.mark.parametrize("kind,T", [("cosine", T) for T in (5, 10, 20, 100, 1000, 4000)]
                         + [("linear", T) for T in (21, 50, 100, 250, 1000, 4000)])  # linear beta_end = 20 / T < 1
def test_every_valid_schedule_ends_in_pure_noise(kind, T):
    """Sampling starts from N(0, I): what training sees at t = T-1 must hold (almost) no signal, for any T."""
    schedule = Schedule(kind=kind, num_timesteps=T)
    abar = alphas_cumprod(schedule)
    assert np.sqrt(abar[-1]) <= MAX_TERMINAL_SIGNAL and abar[-1] > 0 and np.all(np.diff(abar) < 0)
    b = betas(schedule)
    assert np.all((b > 0) & (b < 1))


def test_min_timesteps_as_the_readme_and_help_say():
    assert (min_timesteps("cosine"), min_timesteps("linear")) == (5, 21)
    for kind, T in (("cosine", 4), ("linear", 20)):
        with pytest.raises(ValueError, match=f"at least {T + 1}"):
            Schedule(kind=kind, num_timesteps=T)


def test_linear_betas_scale_with_T():
    s = Schedule(kind="linear", num_timesteps=100)
    assert (s.beta_start, s.beta_end) == pytest.approx((1e-3, 0.2))  # Ho et al.'s 1e-4 .. 0.02 at T = 1000, x 10


@pytest.mark.parametrize("kwargs,message", [
    (dict(kind="linear", num_timesteps=100, beta_start=1e-4, beta_end=0.02), "keeps 60.3% of the image"),
    (dict(kind="cosine", num_timesteps=3), "use more timesteps"),
    (dict(kind="linear", num_timesteps=10), "betas outside"),  # beta_end = 20 / T = 2
    (dict(num_timesteps=1), "at least 2"),
])
def test_schedules_that_cannot_start_from_noise_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Schedule(**kwargs)


@pytest.mark.quick
def test_timestep_sequence():
    np.testing.assert_array_equal(timestep_sequence(1000, 1000), np.arange(999, -1, -1))
    ts = timestep_sequence(1000, 50)
    assert len(ts) == 50 and ts[0] == 999 and ts[-1] == 19 and np.all(np.diff(ts) == -20)
    with pytest.raises(ValueError):
        timestep_sequence(1000, 0)
    with pytest.raises(ValueError):
        timestep_sequence(1000, 1001)


@pytest.mark.quick
def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown schedule"):
        Schedule(kind="sigmoid")
