"""Torch side of the diffusion math: forward process, prediction targets and conversions, loss weights, the
GCC a training step feeds the network, and the training loss.

The schedule itself comes from `patchgen.runtime.schedule` (float64 numpy) and
is only converted here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

from patchgen.runtime.layout import crop_centre, from_patches, pool_gcc, position_onehot, to_patches, to_windows
from patchgen.runtime.schedule import Schedule, alphas_cumprod

from .config import ModelConfig, TrainConfig

Coefficients = tuple[torch.Tensor, torch.Tensor]  # (sqrt(abar_t), sqrt(1 - abar_t)) [T], on the run's device


def schedule_coefficients(schedule: Schedule, device=None) -> Coefficients:
    """(sqrt(abar_t), sqrt(1 - abar_t)) as float32 tensors [T] on `device` (default: the CPU), from the
    float64 schedule."""
    abar = alphas_cumprod(schedule)
    return (torch.from_numpy(np.sqrt(abar).astype(np.float32)).to(device),
            torch.from_numpy(np.sqrt(1 - abar).astype(np.float32)).to(device))


def _bcast(coef: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return coef[t].reshape(-1, *([1] * (like.ndim - 1)))


def q_sample(x0, t, noise, sqrt_abar, sqrt_1m_abar):
    """Forward process: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
    return _bcast(sqrt_abar, t, x0) * x0 + _bcast(sqrt_1m_abar, t, x0) * noise


def prediction_target(kind: str, x0, noise, t, sqrt_abar, sqrt_1m_abar):
    """What the network regresses: eps, x0, or v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022)."""
    if kind == "eps":
        return noise
    if kind == "x0":
        return x0
    return _bcast(sqrt_abar, t, x0) * noise - _bcast(sqrt_1m_abar, t, x0) * x0


def eps_from_prediction(kind: str, pred, x_t, t, sqrt_abar, sqrt_1m_abar):
    """eps implied by the network output: x0 -> (x_t - a x0)/s;  v -> a v + s x_t  (a = sqrt(abar), s = sqrt(1-abar))."""
    if kind == "eps":
        return pred
    a, s = _bcast(sqrt_abar, t, x_t), _bcast(sqrt_1m_abar, t, x_t)
    if kind == "x0":
        return (x_t - a * pred) / s
    return a * pred + s * x_t


def x0_from_prediction(kind: str, pred, x_t, t, sqrt_abar, sqrt_1m_abar):
    """x0 implied by the network output: eps -> (x_t - s eps)/a;  v -> a x_t - s v."""
    if kind == "x0":
        return pred
    a, s = _bcast(sqrt_abar, t, x_t), _bcast(sqrt_1m_abar, t, x_t)
    if kind == "eps":
        return (x_t - s * pred) / a
    return a * x_t - s * pred


def loss_weight(kind: str, weighting: str, t, sqrt_abar, sqrt_1m_abar, gamma: float):
    """Per-sample loss weight. min-SNR-gamma (Hang et al. 2023): min(SNR, gamma) / SNR for eps,
    / (SNR + 1) for v, / 1 for x0, i.e. an x0-error weight of min(SNR, gamma) whatever the parametrisation."""
    if weighting == "none":
        return torch.ones_like(t, dtype=torch.float32)
    snr = (sqrt_abar[t] / sqrt_1m_abar[t]) ** 2
    implicit = {"eps": snr, "v": snr + 1, "x0": torch.ones_like(snr)}[kind]
    return torch.clamp(snr, max=gamma) / implicit


class EpsDenoiser(nn.Module):
    """The network plus the conversion of its prediction to eps: the single-patch contract of the ONNX file."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.prediction = net.config.prediction
        sqrt_abar, sqrt_1m_abar = schedule_coefficients(net.config.schedule)
        self.register_buffer("sqrt_abar", sqrt_abar, persistent=False)
        self.register_buffer("sqrt_1m_abar", sqrt_1m_abar, persistent=False)

    def forward(self, x, t, pos: Optional[torch.Tensor] = None, gcc: Optional[torch.Tensor] = None):
        """x [B, C, P+2M, P+2M] windows -> eps [B, C, P, P] of their centres."""
        pred = self.net(x, t, pos, gcc)
        x_t = crop_centre(x, self.net.config.halo)
        return eps_from_prediction(self.prediction, pred, x_t, t, self.sqrt_abar, self.sqrt_1m_abar)


def select_patches(patches: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """patches [B, G*G, ...] and index [B, K] -> the chosen ones, flattened: [B*K, ...]."""
    b, k = index.shape
    chosen = torch.gather(patches, 1, index.reshape(b, k, *[1] * (patches.ndim - 2)).expand(-1, -1, *patches.shape[2:]))
    return chosen.reshape(b * k, *patches.shape[2:])


def patch_inputs(config: ModelConfig, x_t: torch.Tensor, gcc: Optional[torch.Tensor], index: torch.Tensor):
    """Flatten chosen patches of each image into one network batch.

    x_t [B, C, H, W]; gcc [B, C, P, P] or None; index [B, K] patch positions per image.
    Returns (windows [B*K, C, P+2M, P+2M] (the patches themselves when M = 0), pos [B*K, G*G] or None,
    gcc [B*K, C, P, P] or None). Windows are cut by the runtime's own `to_windows`.
    """
    b, k = index.shape
    windows = select_patches(to_windows(x_t, config.grid, config.halo), index)
    pos = None
    if config.use_position:
        pos = torch.from_numpy(position_onehot(config.grid, index.reshape(-1).cpu().numpy())).to(x_t.device)
    if gcc is not None:
        gcc = gcc[:, None].expand(-1, k, -1, -1, -1).reshape(b * k, *gcc.shape[1:])
    return windows, pos, gcc


def predict_full(net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, gcc: Optional[torch.Tensor]) -> torch.Tensor:
    """Run every patch of every image through `net` and merge: the raw prediction [B, C, H, W]."""
    config = net.config
    b, g2 = x_t.shape[0], config.grid**2
    index = torch.arange(g2, device=x_t.device).expand(b, -1)
    patches, pos, gcc_p = patch_inputs(config, x_t, gcc, index)
    pred = net(patches, t.repeat_interleave(g2), pos, gcc_p)
    return from_patches(pred.reshape(b, g2, *pred.shape[1:]), config.grid)


def draw_self_condition(config: ModelConfig, gen: torch.Generator) -> bool:
    """For gcc_source "x0" (self-conditioning): whether this step's GCC is the pooled first estimate (True, half
    the steps) or zeros (as at the first sampling step). Draws from `gen` only for such a model."""
    if not (config.use_gcc and config.gcc_source == "x0"):
        return False
    return bool(torch.rand((), generator=gen) < 0.5)


def gcc_input(net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, self_condition: bool,
              coefs: Optional[Coefficients] = None) -> Optional[torch.Tensor]:
    """The GCC the network sees during training [B, C, P, P] (None for a model without GCC): x_t [B, C, H, W]
    average-pooled to the patch size (gcc_source "xt", the paper's Global Content Conditioning), or, for
    gcc_source "x0", the pooled no-grad first estimate x0_hat made with zero GCC over all patches when
    `self_condition` (`draw_self_condition`), else zeros. coefs: the schedule's (`schedule_coefficients`) on
    x_t's device; built here when not given."""
    config = net.config
    if not config.use_gcc:
        return None
    if config.gcc_source == "xt":
        return pool_gcc(x_t, config.patch_size)
    p = config.patch_size
    gcc = torch.zeros(x_t.shape[0], config.channels, p, p, device=x_t.device)
    if self_condition:
        with torch.no_grad():
            coefs = coefs or schedule_coefficients(config.schedule, x_t.device)
            x0_hat = x0_from_prediction(config.prediction, predict_full(net, x_t, t, gcc), x_t, t, *coefs)
            gcc = pool_gcc(x0_hat.clamp(-1, 1), p)
    return gcc


@dataclass(frozen=True)
class Draws:
    """The randomness of one training batch of B images (`draw_batch`). A data-parallel run draws the whole
    global batch on every rank and each rank takes its `part`, so the stream is the same at any world size."""
    t: torch.Tensor  # [B] int64 timesteps in [0, T)
    noise: torch.Tensor  # [B, C, H, W] float32, N(0, I)
    self_condition: bool  # see draw_self_condition
    index: Optional[torch.Tensor]  # [B, K] the patch positions each image trains on; None = all G*G

    def part(self, images: slice) -> "Draws":
        """The draws of the images `images` (a slice of the batch)."""
        index = None if self.index is None else self.index[images]
        return Draws(self.t[images], self.noise[images], self.self_condition, index)


def draw_batch(config: ModelConfig, train_config: TrainConfig, batch: int, gen: torch.Generator) -> Draws:
    """Draw one batch's randomness from `gen` in a fixed order: t ~ U[0, T), the noise, the self-conditioning
    coin, then (with train_config.patches_per_image < G*G) a random subset of positions per image. All on the CPU."""
    g2, size = config.grid**2, config.image_size
    t = torch.randint(0, config.schedule.num_timesteps, (batch,), generator=gen)
    noise = torch.randn((batch, config.channels, size, size), generator=gen)
    self_condition = draw_self_condition(config, gen)
    index = None
    if 0 < train_config.patches_per_image < g2:
        index = torch.rand(batch, g2, generator=gen).argsort(dim=1)[:, : train_config.patches_per_image]
    return Draws(t, noise, self_condition, index)


def diffusion_loss(net: nn.Module, x0: torch.Tensor, draws: Draws, train_config: TrainConfig,
                   coefs: Coefficients) -> torch.Tensor:
    """One Monte-Carlo estimate of the DDPM loss (Ho et al. 2020, eq. 14, with the target and weighting of
    `prediction_target` and `loss_weight`) on the patches of x0 [B, C, H, W] in [-1, 1]: x_t by `q_sample`
    at the drawn t and noise, then the drawn patches of each image (`draws.index`, or all G*G) through `net`
    with their positions and GCC. `net` may be wrapped (DistributedDataParallel): the wrapper runs the
    forward pass that backpropagates. coefs: `schedule_coefficients` on x0's device. A scalar tensor, the mean
    over the B images."""
    plain = getattr(net, "module", net)
    config, dev = plain.config, x0.device
    b, g2 = x0.shape[0], config.grid**2
    t, noise = draws.t.to(dev), draws.noise.to(dev)
    x_t = q_sample(x0, t, noise, *coefs)
    gcc = gcc_input(plain, x_t, t, draws.self_condition, coefs)
    index = torch.arange(g2).expand(b, -1) if draws.index is None else draws.index
    index = index.to(dev)
    patches, pos, gcc_p = patch_inputs(config, x_t, gcc, index)
    target = prediction_target(config.prediction, x0, noise, t, *coefs)
    target = select_patches(to_patches(target, config.grid), index)  # the centre P x P of each window
    tp = t.repeat_interleave(index.shape[1])
    pred = net(patches, tp, pos, gcc_p)
    err = (pred - target).abs() if train_config.loss == "l1" else (pred - target) ** 2
    w = loss_weight(config.prediction, train_config.loss_weighting, tp, *coefs, train_config.min_snr_gamma)
    return (w * err.mean(dim=(1, 2, 3))).mean()
