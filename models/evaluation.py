"""What a training run measures at each preview: a grid of samples, its seam score beside the real images',
and whether the network uses its Global Content Conditioning (the GCC-swap probe). One row of eval_log.csv."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from patchgen.runtime.images import make_grid, save_png, to_uint8
from patchgen.runtime.layout import pool_gcc

from .data import to_model_range
from .diffusion import predict_full, q_sample, schedule_coefficients, x0_from_prediction
from .metrics import seam_grid, seam_score
from .sample import sample_torch
from .unet import PatchUNet

NOISE_BANDS = ((0, 300), (300, 700), (700, 1000))  # t in per mille of T: the same bands, and names, for any T
EVAL_COLUMNS = ["step", "seam", "seam_real", *(f"swap_increase_{lo}_{hi}" for lo, hi in NOISE_BANDS),
                "mse_true_gcc_{}_{}".format(*NOISE_BANDS[-1])]


def write_preview(path: Path, net: PatchUNet, count: int, steps: int, seed: int, data_name: str) -> np.ndarray:
    """A grid of `count` samples, patch by patch through the runtime's sampling loop (DDIM, eta = 0), saved
    as a PNG at `path`; returns the samples, uint8 [count, H, W, C]."""
    images = to_uint8(sample_torch(net, count, seed=seed, steps=steps))
    save_png(path, make_grid(images), {"patchgen:seed": str(seed), "patchgen:data": data_name})
    return images


def evaluate(run_dir: Path, step: int, ema: PatchUNet, probe_images: np.ndarray, seed: int, data_name: str,
             count: int, steps: int) -> dict:
    """preview_<step>.png, its seam score next to the real `probe_images`' (uint8 [N, H, W, C]), and the
    GCC probe per noise band, appended as one row of eval_log.csv; returns the row."""
    grid = ema.config.grid
    samples = write_preview(run_dir / f"preview_{step:07d}.png", ema, count, steps, seed, data_name)
    row = {"step": step, "seam": seam_score(samples, seam_grid(grid)),
           "seam_real": seam_score(probe_images, seam_grid(grid))}
    device = next(ema.parameters()).device
    probe = gcc_probe(ema, torch.from_numpy(to_model_range(probe_images)).to(device))
    for (lo, hi), band in zip(NOISE_BANDS, probe):
        row[f"swap_increase_{lo}_{hi}"] = band["swap_increase"]
    if probe:
        row["mse_true_gcc_{}_{}".format(*NOISE_BANDS[-1])] = probe[-1]["mse_true_gcc"]
    path = run_dir / "eval_log.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, EVAL_COLUMNS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: (f"{v:.5g}" if isinstance(v, float) else v) for k, v in row.items()})
    return row


@torch.no_grad()
def gcc_probe(net: PatchUNet, x0: torch.Tensor, seed: int = 0) -> list[dict]:
    """Does the network use GCC? Per noise band (NOISE_BANDS, in that order), the x0_hat error with the true
    GCC and with another image's GCC (the batch rolled by one). A coherent model must lose accuracy at high
    noise when its GCC is swapped: the layout is decided there. Fixed noise (from `seed`) makes runs
    comparable over time. x0: [B, C, H, W] in [-1, 1]. Empty for a model without GCC."""
    config = net.config
    if not config.use_gcc:
        return []
    was_training = net.training
    net.eval()
    gen = torch.Generator().manual_seed(seed)
    coefs = schedule_coefficients(config.schedule, x0.device)
    T, rows = config.schedule.num_timesteps, []
    for lo, hi in NOISE_BANDS:
        t_lo = lo * T // 1000
        t_hi = max(hi * T // 1000, t_lo + 1)  # t in [t_lo, t_hi): at least one timestep, however small T is
        t = torch.randint(t_lo, t_hi, (x0.shape[0],), generator=gen).to(x0.device)
        noise = torch.randn(x0.shape, generator=gen).to(x0.device)
        x_t = q_sample(x0, t, noise, *coefs)
        if config.gcc_source == "xt":
            gcc = pool_gcc(x_t, config.patch_size)
        else:  # self-conditioning: the first estimate's pooled x0_hat, as the second pass sees it
            zeros = torch.zeros(x0.shape[0], config.channels, config.patch_size, config.patch_size, device=x0.device)
            first = x0_from_prediction(config.prediction, predict_full(net, x_t, t, zeros), x_t, t, *coefs)
            gcc = pool_gcc(first.clamp(-1, 1), config.patch_size)
        errors = []
        for g in (gcc, gcc.roll(1, dims=0)):
            x0_hat = x0_from_prediction(config.prediction, predict_full(net, x_t, t, g), x_t, t, *coefs)
            errors.append(((x0_hat.clamp(-1, 1) - x0) ** 2).mean().item())
        rows.append({"band": f"{lo}-{hi}", "mse_true_gcc": errors[0], "mse_swapped_gcc": errors[1],
                     "swap_increase": errors[1] / max(errors[0], 1e-12) - 1})
    net.train(was_training)
    return rows
