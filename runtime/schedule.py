"""Noise schedules in float64 numpy: the only copy; training converts it to tensors."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

SCHEDULE_KINDS = ("cosine", "linear")
# Sampling starts from x_T ~ N(0, I), which is what training saw at t = T-1 only if almost no signal is left
# there: sqrt(alphas_cumprod[T-1]) (the weight of x0 in x_{T-1}) must be at most this, 1 % of the image,
# about one uint8 level. Ho et al.'s linear schedule at T = 1000 leaves 0.64 %, the cosine one 0.005 %.
MAX_TERMINAL_SIGNAL = 0.01


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
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"unknown schedule kind {self.kind!r}; expected one of {SCHEDULE_KINDS}")
        if self.num_timesteps < 2:
            raise ValueError(f"a schedule needs at least 2 timesteps, got {self.num_timesteps}")
        T = self.num_timesteps
        if self.beta_start is None:
            object.__setattr__(self, "beta_start", 0.1 / T)
        if self.beta_end is None:
            object.__setattr__(self, "beta_end", 20.0 / T)
        b = betas(self)
        if not (np.all(b > 0) and np.all(b < 1)):
            raise ValueError(f"a {self.kind} schedule with T = {T} has betas outside (0, 1) "
                             f"(beta_end {self.beta_end:g}); use more timesteps or smaller betas")
        signal = math.sqrt(alphas_cumprod(self)[-1])
        if signal > MAX_TERMINAL_SIGNAL:
            raise ValueError(f"a {self.kind} schedule with T = {T} keeps {signal:.1%} of the image at t = T-1, "
                             f"more than the {MAX_TERMINAL_SIGNAL:.0%} that sampling from pure noise allows; "
                             f"use more timesteps (or larger betas)")


def betas(schedule: Schedule) -> np.ndarray:
    """beta_t for t = 0 .. T-1, float64."""
    T = schedule.num_timesteps
    if schedule.kind == "linear":
        return np.linspace(schedule.beta_start, schedule.beta_end, T, dtype=np.float64)
    # Cosine: abar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) * pi/2); beta_t = 1 - abar(t+1)/abar(t).
    s = schedule.cosine_s
    steps = np.arange(T + 1, dtype=np.float64) / T
    f = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return np.minimum(1 - f[1:] / f[:-1], schedule.max_beta)


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
