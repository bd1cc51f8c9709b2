"""Noise schedules in float64 numpy: the only copy; training converts it to tensors."""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .checks import Problems, is_int, shown

SCHEDULE_KINDS = ("cosine", "linear")
# Sampling starts from x_T ~ N(0, I), which is what training saw at t = T-1 only if almost no signal is left
# there: sqrt(alphas_cumprod[T-1]) (the weight of x0 in x_{T-1}) must be at most this, 1 % of the image,
# about one uint8 level. Ho et al.'s linear schedule at T = 1000 leaves 0.64 %, the cosine one 0.005 %.
MAX_TERMINAL_SIGNAL = 0.01
# T is read from checkpoints and ONNX metadata, which are untrusted; the schedule's arrays are float64 [T], built
# several times over while it is checked. The paper uses 1000 and DDPM-style models rarely more than 4000; 100k
# is far beyond any use and still cheap (a few MB of arrays, timestep indices exact in float32).
MAX_TIMESTEPS = 100_000


@dataclass(frozen=True)
class Schedule:
    """A discrete DDPM noise schedule over timestep indices t = 0 .. num_timesteps-1."""

    kind: str = "cosine"  # "cosine" (Nichol & Dhariwal 2021, the paper's) or "linear" (Ho et al. 2020)
    num_timesteps: int = 1000
    cosine_s: float = 0.008  # cosine offset s, keeps beta_0 from vanishing
    max_beta: float = 0.999  # cosine betas are clipped here to avoid a singularity at t = T
    # Linear schedule, beta_1 .. beta_T. Unset: Ho et al.'s 1e-4 .. 0.02 at T = 1000, scaled by 1000 / T
    # (Nichol & Dhariwal 2021, improved-diffusion), so any T runs from almost clean to almost pure noise.
    beta_start: Optional[float] = None
    beta_end: Optional[float] = None

    def __post_init__(self):
        if not isinstance(self.kind, str) or self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"unknown schedule kind {shown(self.kind)}; expected one of {SCHEDULE_KINDS}")
        problems = schedule_problems(self.num_timesteps, self.cosine_s, self.max_beta, self.beta_start,
                                     self.beta_end)
        if problems:  # before any array is built: the check below takes memory in proportion to T
            raise ValueError(problems.message())
        for name in ("cosine_s", "max_beta", "beta_start", "beta_end"):  # numpy scalars -> plain floats
            if getattr(self, name) is not None:
                object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "num_timesteps", int(self.num_timesteps))
        T = self.num_timesteps
        if self.beta_start is None:
            object.__setattr__(self, "beta_start", 0.1 / T)
        if self.beta_end is None:
            object.__setattr__(self, "beta_end", 20.0 / T)
        problem = _problem(_betas(self.kind, T, self.cosine_s, self.max_beta, self.beta_start, self.beta_end))
        if problem:
            raise ValueError(f"a {self.kind} schedule with T = {T} {problem}; use more timesteps (with the default "
                             f"parameters, at least {min_timesteps(self.kind)})")


def schedule_problems(num_timesteps, cosine_s, max_beta, beta_start, beta_end) -> Problems:
    """What is wrong with a schedule's numbers on their own (types, T, finite parameters in range); cheap,
    so it runs before the betas are computed. beta_start / beta_end may be None (scaled defaults)."""
    problems = Problems()
    if not is_int(num_timesteps):
        problems.add("num_timesteps", f"must be an integer, got {shown(num_timesteps)}")
    elif num_timesteps < 2:
        problems.add("num_timesteps", f"must be at least 2 (a schedule needs at least 2 timesteps), got "
                                      f"{num_timesteps}")
    elif num_timesteps > MAX_TIMESTEPS:
        problems.add("num_timesteps", f"must be at most {MAX_TIMESTEPS} (the paper uses 1000), got "
                                      f"{shown(num_timesteps)}")
    problems.real("cosine_s", cosine_s, 0.0, 1.0)
    problems.real("max_beta", max_beta, 0.0, 1.0, low_open=True, high_open=True)
    for name, value in (("beta_start", beta_start), ("beta_end", beta_end)):
        if value is not None:
            problems.real(name, value, 0.0, 1.0, low_open=True, high_open=True)
    return problems


def _betas(kind: str, T: int, cosine_s: float, max_beta: float, beta_start: float, beta_end: float) -> np.ndarray:
    if kind == "linear":
        return np.linspace(beta_start, beta_end, T, dtype=np.float64)
    # Cosine: abar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) * pi/2); beta_t = 1 - abar(t+1)/abar(t).
    steps = np.arange(T + 1, dtype=np.float64) / T
    f = np.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
    return np.minimum(1 - f[1:] / f[:-1], max_beta)


def _problem(b: np.ndarray) -> Optional[str]:
    """Why betas `b` cannot be sampled from pure noise, or None."""
    if not (np.all(b > 0) and np.all(b < 1)):
        return f"has betas outside (0, 1) (largest {b.max():g})"
    signal = math.sqrt(np.prod(1.0 - b))  # sqrt(alphas_cumprod[T-1])
    if signal > MAX_TERMINAL_SIGNAL:
        return (f"keeps {signal:.1%} of the image at t = T-1, more than the {MAX_TERMINAL_SIGNAL:.0%} that "
                f"sampling from pure noise allows")
    return None


@functools.lru_cache(maxsize=None)
def min_timesteps(kind: str) -> int:
    """The fewest timesteps T for which a `kind` schedule with default parameters is valid."""
    d = {f.name: f.default for f in dataclasses.fields(Schedule)}
    for T in range(2, MAX_TIMESTEPS + 1):
        if _problem(_betas(kind, T, d["cosine_s"], d["max_beta"], 0.1 / T, 20.0 / T)) is None:
            return T
    raise ValueError(f"no valid {kind} schedule with default parameters")


def betas(schedule: Schedule) -> np.ndarray:
    """beta_t for t = 0 .. T-1, float64."""
    s = schedule
    return _betas(s.kind, s.num_timesteps, s.cosine_s, s.max_beta, s.beta_start, s.beta_end)


@functools.lru_cache(maxsize=8)
def alphas_cumprod(schedule: Schedule) -> np.ndarray:
    """abar_t = prod_{i<=t} (1 - beta_i), float64, read-only (it is cached)."""
    abar = np.cumprod(1.0 - betas(schedule))
    abar.flags.writeable = False
    return abar


def timestep_sequence(num_timesteps: int, steps: int) -> np.ndarray:
    """`steps` distinct timestep indices, int64, strictly descending from T-1, all in [0, T-1].

    The "trailing" spacing of Lin et al. 2024 (table 2), with floor for its rounding:
    t_k = T - 1 - floor(k T / steps), k = 0 .. steps-1.
    It always starts at t = T-1, so sampling starts from pure noise; T / steps >= 1 makes the floors
    strictly increasing, and k <= steps - 1 keeps t_k >= 0. Integer arithmetic: no float stride can add
    or drop a step.
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
    k = np.arange(steps, dtype=np.int64)
    return num_timesteps - 1 - (k * num_timesteps) // steps
