"""Noise schedules in float64 numpy: the only copy; training converts it to tensors."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

SCHEDULE_KINDS = ("cosine", "linear")


@dataclass(frozen=True)
class Schedule:
    """A discrete DDPM noise schedule over timestep indices t = 0 .. num_timesteps-1."""

    kind: str = "cosine"  # "cosine" (Nichol & Dhariwal 2021, the paper's) or "linear" (Ho et al. 2020)
    num_timesteps: int = 1000
    cosine_s: float = 0.008  # cosine offset s, keeps beta_0 from vanishing
    max_beta: float = 0.999  # cosine betas are clipped here to avoid a singularity at t = T
    beta_start: float = 1e-4  # linear schedule, for T = 1000
    beta_end: float = 0.02

    def __post_init__(self):
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"unknown schedule kind {self.kind!r}; expected one of {SCHEDULE_KINDS}")
        if self.num_timesteps < 2:
            raise ValueError(f"a schedule needs at least 2 timesteps, got {self.num_timesteps}")


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
    """`steps` timestep indices from T-1 down to 0, evenly strided (the DDIM "trailing" spacing)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
    # Trailing spacing always includes t = T-1, so sampling starts from pure noise.
    ts = np.round(np.arange(num_timesteps, 0, -num_timesteps / steps)).astype(np.int64) - 1
    return ts
