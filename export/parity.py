"""Parity of an exported graph with the torch model it came from: the error measures, their tolerances, and
the timesteps they (and int8's calibration) run at.

Both measures compare onnxruntime's eps with torch's (`EpsDenoiser`) on the same inputs and divide the
difference by `parity_scale(t)`, so the error is in the model's own parametrisation: `max_parity_error` for
the float32 graph (the worst sample, on fixed timesteps and every patch position), `parity_rms` for an fp16
or int8 file (the RMS over realistic windows, export/quantize.py).
"""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import torch

from patchgen.models.diffusion import EpsDenoiser
from patchgen.models.unet import PatchUNet
from patchgen.runtime.errors import ArgumentError
from patchgen.runtime.schedule import Schedule, alphas_cumprod
from patchgen.runtime.session import open_session
from patchgen.runtime.spec import example_feeds

# Max fp32 error of the graph against torch, in the units of what the network predicts (see parity_scale).
PARITY_TOLERANCE = 1e-4
PARITY_TIMESTEPS = 9  # timesteps the float32 check runs at, `spread_timesteps` over [0, T)
# Parity of a reduced-precision file against torch in float32, as the RMS over realistic windows of the error
# in the model's own parametrisation (|delta eps| / parity_scale(t)). The network's outputs are O(0.5) (x0
# and v in [-1, 1], eps ~ N(0, 1)). fp16 rounds to 2^-11 relative; through the U-Net that grows to 2.6e-4
# (the shipped faces64_2x2) - 2.7e-4 (the 64x64 4x4 halo-study model): the bound is about 20x that. int8
# keeps 8 bits per tensor: 6.8e-3 and 5.6e-3 on the same two models; its bound of 0.1 (about 15x) is there
# to catch a broken quantization, not a subtle loss: what int8 costs in sample quality is measured by KID
# (benchmarks/quality.py).
PARITY_RMS_TOLERANCE = {"fp16": 5e-3, "int8": 0.1}


class ParityFailed(ArgumentError):
    """A graph outside its tolerance, so no file was written. weights: "fp32" (the measure is `max_parity_error`)
    or "fp16" / "int8" (`parity_rms`); error: the measure (NaN for a graph that gives NaN), limit: its tolerance,
    both in the units of what the network predicts (`prediction`: "eps", "v" or "x0")."""

    def __init__(self, weights: str, prediction: str, error: float, limit: float):
        failed = "parity check failed: max error" if weights == "fp32" else f"{weights} parity check failed: RMS error"
        super().__init__(f"{failed} in the model's own parametrisation ({prediction}) = {error:.3g} > {limit:g}; ",
                         "no file written ({check} writes it anyway)", check=False)
        self.weights, self.prediction, self.error, self.limit = weights, prediction, error, limit


def spread_timesteps(num_timesteps: int, count: int) -> np.ndarray:
    """int64 [<= count]: `count` timesteps evenly spread over [0, T), always 0 and T-1 (fewer when T < count)."""
    # t_k = floor(k (T-1) / (count-1)), k = 0 .. count-1: exact integers, t_0 = 0, t_last = T-1.
    k = np.arange(count, dtype=np.int64)
    return np.unique(k * (num_timesteps - 1) // (count - 1))


def eps_gain(prediction: str, schedule: Schedule) -> np.ndarray:
    """|d eps / d prediction| per timestep [T], float64: how much the graph's conversion to eps scales an
    error in the network's own output (a = sqrt(abar_t), s = sqrt(1 - abar_t))."""
    abar = alphas_cumprod(schedule)
    if prediction == "x0":
        # eps = (x_t - a x0) / s: gain a/s, largest at t = 0 (cosine, T = 1000: ~156).
        return np.sqrt(abar) / np.sqrt(1 - abar)
    if prediction == "v":
        # eps = a v + s x_t: gain a <= 1.
        return np.sqrt(abar)
    return np.ones_like(abar)


def parity_scale(prediction: str, schedule: Schedule) -> np.ndarray:
    """max(eps_gain, 1) per timestep [T]: the divisor that turns |delta eps| into the parity error.

    Gain > 1 (x0 at low t): the conversion multiplies the network's fp32 rounding by the gain (and that of
    x_t - a x0 by 1/s), so dividing it out gives the error in the network's own units. Gain < 1 (v at all t,
    x0 at high t): dividing would magnify the rounding of the conversion itself (s x_t, the 1/s), which is
    no fault of the graph, so the error stays in eps units, what the sampler consumes. A wrong graph is
    wrong at every t and shows at full size where the gain is about 1 (v at low t, x0 at mid t)."""
    return np.maximum(eps_gain(prediction, schedule), 1.0)


def scaled_errors(net: PatchUNet, model_path, feeds: Iterable[dict]) -> Iterator[np.ndarray]:
    """(eps_onnxruntime - eps_torch) / parity_scale(t) for each feed dict (the graph's inputs): float64
    [B, C, P, P], the error in the model's own parametrisation. The graph at `model_path` is opened once."""
    session = open_session(model_path)
    module = EpsDenoiser(net).eval()
    scale = parity_scale(net.config.prediction, net.config.schedule)
    for f in feeds:
        with torch.no_grad():
            ref = module(**{k: torch.from_numpy(v) for k, v in f.items()}).numpy()
        yield (session.run(["eps"], f)[0] - ref) / scale[f["t"]].reshape(-1, 1, 1, 1)


def parity_feeds(net: PatchUNet, batches=(1, 3), seed: int = 0) -> Iterator[dict]:
    """The float32 check's inputs: every batch size in `batches` runs every `spread_timesteps` timestep (the
    last batch wraps around to stay full), and every patch position is fed at least once (positions in
    turn, then batches of random t until all G*G were seen); x and gcc ~ N(0, 1) from `seed`."""
    config = net.config
    num_timesteps = config.schedule.num_timesteps
    rng = np.random.default_rng(seed)
    position = 0

    def feeds(t: np.ndarray) -> dict:
        nonlocal position
        position += len(t)
        return example_feeds(config.spec, t, rng, position - len(t))

    ts = spread_timesteps(num_timesteps, PARITY_TIMESTEPS)
    for b in batches:
        for start in range(0, len(ts), b):
            yield feeds(np.resize(ts[start:start + b], b))
    while position < config.grid**2:
        yield feeds(rng.integers(0, num_timesteps, max(batches)))


def max_parity_error(net: PatchUNet, model_path, batches=(1, 3), seed: int = 0) -> float:
    """max over samples of |eps_onnxruntime - eps_torch| / parity_scale(t) on `parity_feeds`: the float32
    graph's error in the model's own parametrisation (NaN when the graph gives NaN)."""
    errors = [np.abs(e).reshape(len(e), -1).max(axis=1)
              for e in scaled_errors(net, model_path, parity_feeds(net, batches, seed))]
    return float(np.max(np.concatenate(errors)))  # NaN propagates, and fails the check


def parity_rms(net: PatchUNet, model_path, feeds: list[dict]) -> float:
    """RMS over `feeds` of |eps_onnxruntime - eps_torch| / parity_scale(t): the error in the model's own units."""
    total, count = 0.0, 0
    for err in scaled_errors(net, model_path, feeds):
        total += float(np.sum(err.astype(np.float64) ** 2))
        count += err.size
    return float(np.sqrt(total / count))


def checked_max_error(net: PatchUNet, model_path) -> float:
    """`max_parity_error` of the float32 graph at `model_path`; ParityFailed above PARITY_TOLERANCE (or NaN)."""
    error = max_parity_error(net, model_path)
    if not error <= PARITY_TOLERANCE:  # also catches NaN
        raise ParityFailed("fp32", net.config.prediction, error, PARITY_TOLERANCE)
    return error


def checked_rms(net: PatchUNet, model_path, weights: str, feeds: list[dict]) -> float:
    """`parity_rms` of the `weights` ("fp16", "int8") file at `model_path` on `feeds`; ParityFailed above
    PARITY_RMS_TOLERANCE[weights] (or NaN)."""
    error, limit = parity_rms(net, model_path, feeds), PARITY_RMS_TOLERANCE[weights]
    if not error <= limit:
        raise ParityFailed(weights, net.config.prediction, error, limit)
    return error

