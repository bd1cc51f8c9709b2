"""Torch side of the diffusion math: forward process, prediction targets and conversions, loss weights.

The schedule itself comes from `patchgen.runtime.schedule` (float64 numpy) and
is only converted here.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from patchgen.runtime.layout import crop_centre, from_patches, position_onehot, to_windows
from patchgen.runtime.schedule import Schedule, alphas_cumprod

from .config import ModelConfig


def schedule_coefficients(schedule: Schedule) -> tuple[torch.Tensor, torch.Tensor]:
    """(sqrt(abar_t), sqrt(1 - abar_t)) as float32 tensors [T], from the float64 schedule."""
    abar = alphas_cumprod(schedule)
    return torch.from_numpy(np.sqrt(abar).astype(np.float32)), torch.from_numpy(np.sqrt(1 - abar).astype(np.float32))


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
        pos = torch.from_numpy(position_onehot(config.grid)).to(x_t.device)[index.reshape(-1)]
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
