"""The float64 schedule: pinned values (Nichol & Dhariwal cosine, Ho et al. linear) and timestep spacing."""
import numpy as np
import pytest

from patchgen.runtime.schedule import Schedule, alphas_cumprod, betas, timestep_sequence


def test_cosine_schedule_pinned():
    abar = alphas_cumprod(Schedule())
    assert abar.dtype == np.float64 and abar.shape == (1000,)
    assert abar[0] == pytest.approx(0.999958715775178, abs=1e-12)
    assert abar[499] == pytest.approx(0.4938435904406382, abs=1e-12)
    assert abar[-1] == pytest.approx(2.4287669070348567e-09, rel=1e-9)
    assert np.all(np.diff(abar) < 0)
    assert betas(Schedule()).max() <= 0.999


def test_linear_schedule_pinned():
    abar = alphas_cumprod(Schedule(kind="linear"))
    assert abar[0] == pytest.approx(0.9999, abs=1e-12)
    assert abar[-1] == pytest.approx(4.035829765375676e-05, rel=1e-9)


def test_schedule_is_read_only():
    with pytest.raises(ValueError):
        alphas_cumprod(Schedule())[0] = 1.0


def test_timestep_sequence():
    np.testing.assert_array_equal(timestep_sequence(1000, 1000), np.arange(999, -1, -1))
    ts = timestep_sequence(1000, 50)
    assert len(ts) == 50 and ts[0] == 999 and ts[-1] == 19 and np.all(np.diff(ts) == -20)
    with pytest.raises(ValueError):
        timestep_sequence(1000, 0)
    with pytest.raises(ValueError):
        timestep_sequence(1000, 1001)


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown schedule"):
        Schedule(kind="sigmoid")
