"""What a training run measures at each preview: a grid of samples, its local seam score beside the real images',
its KID against them, whether the network uses its Global Content Conditioning (the GCC-swap probe), and
whether those numbers still improve. One row of eval_log.csv and one line for the log."""
from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from patchgen.runtime.files import atomic_output
from patchgen.runtime.images import make_grid, save_png, to_uint8
from patchgen.runtime.layout import pool_gcc

from .data import to_model_range
from .diffusion import predict_full, q_sample, schedule_coefficients, x0_from_prediction
from .features import effnet_features, features_available
from .metrics import kid, local_seam_score, seam_grid, seam_score
from .sample import sample_torch
from .unet import PatchUNet

NOISE_BANDS = ((0, 300), (300, 700), (700, 1000))  # t in per mille of T: the same bands, and names, for any T
EVAL_COLUMNS = ["step", "seam", "seam_real", "kid_x1000", "loss", "seam_global", "seam_global_real",
                *(f"swap_increase_{lo}_{hi}" for lo, hi in NOISE_BANDS), "mse_true_gcc_{}_{}".format(*NOISE_BANDS[-1])]
# Logs written before the local seam score: their "seam" columns held the global score.
RENAMED_COLUMNS = {"seam": "seam_global", "seam_real": "seam_global_real"}
# By how much a number must beat its best at an earlier preview to count as a new best (the verdict line): KID
# x1000 and the local seam's distance from the real images' in their own units, the loss as a fraction of it.
IMPROVEMENT = {"kid_x1000": 2.0, "seam_gap": 0.02, "loss": 0.01}
PATIENCE = 3  # previews without a new best before the verdict says the run no longer improves
def write_preview(path: Path, net: PatchUNet, count: int, steps: int, seed: int, data_name: str) -> np.ndarray:
    """A grid of `count` samples, patch by patch through the runtime's sampling loop (DDIM, eta = 0), saved
    as a PNG at `path`; returns the samples, uint8 [count, H, W, C]."""
    images = to_uint8(sample_torch(net, count, seed=seed, steps=steps))
    save_png(path, make_grid(images), {"patchgen:seed": str(seed), "patchgen:data": data_name})
    return images


def evaluate(run_dir: Path, step: int, ema: PatchUNet, probe_images: np.ndarray, seed: int, data_name: str,
             count: int, steps: int, loss: Optional[float] = None) -> dict:
    """preview_<step>.png, its local seam score next to the real `probe_images`' (uint8 [N, H, W, C]), its KID
    against them (x 1000; where the feature network is installed), the mean training `loss` since the last
    preview, the global seam score, and the GCC probe per noise band, appended as one row of eval_log.csv;
    returns the row."""
    grid = seam_grid(ema.config.grid)
    samples = write_preview(run_dir / f"preview_{step:07d}.png", ema, count, steps, seed, data_name)
    row = {"step": step, "seam": local_seam_score(samples, grid), "seam_real": local_seam_score(probe_images, grid),
           "kid_x1000": preview_kid(samples, probe_images), "loss": loss,
           "seam_global": seam_score(samples, grid), "seam_global_real": seam_score(probe_images, grid)}
    device = next(ema.parameters()).device
    probe = gcc_probe(ema, torch.from_numpy(to_model_range(probe_images)).to(device))
    for (lo, hi), band in zip(NOISE_BANDS, probe):
        row[f"swap_increase_{lo}_{hi}"] = band["swap_increase"]
    if probe:
        row["mse_true_gcc_{}_{}".format(*NOISE_BANDS[-1])] = probe[-1]["mse_true_gcc"]
    path = run_dir / "eval_log.csv"
    upgrade_log(path)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, EVAL_COLUMNS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: (f"{v:.5g}" if isinstance(v, float) else ("" if v is None else v))
                         for k, v in row.items()})
    return row


def upgrade_log(path: Path) -> None:
    """Rewrite an eval_log.csv of an older patchgen (atomically) under today's EVAL_COLUMNS, so that a resumed
    run appends rows that match its header: old columns renamed (RENAMED_COLUMNS), new ones left empty."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0] == EVAL_COLUMNS:
        return
    header = [RENAMED_COLUMNS.get(name, name) for name in rows[0]]
    text = io.StringIO()
    writer = csv.DictWriter(text, EVAL_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(dict(zip(header, r)) for r in rows[1:] if len(r) == len(header))
    with atomic_output(path) as f:
        f.write(text.getvalue().encode())


_real_features: dict[str, np.ndarray] = {}  # per set of real images (by content): computed once per process


def preview_kid(samples: np.ndarray, real: np.ndarray) -> Optional[float]:
    """KID x 1000 of a preview's samples against the real images (both uint8 [N, H, W, 3]) on EfficientNet-Lite0
    features, as benchmarks/quality.py measures it; None without the feature network or with fewer than 2
    images on a side. With 16 samples it is noisy (its spread across seeds is of the order of its value late in
    a run), but every preview of a run draws the same noise, so its trend is what to read."""
    if len(samples) < 2 or len(real) < 2 or samples.shape[-1] != 3 or not features_available():
        return None
    key = hashlib.sha256(np.ascontiguousarray(real).tobytes()).hexdigest()
    if key not in _real_features:
        _real_features.clear()
        _real_features[key] = effnet_features(real)
    return 1000 * kid(effnet_features(samples), _real_features[key])


def read_log(path: Path) -> list[dict]:
    """The rows of an eval_log.csv as dicts of floats, oldest first; None where a cell is empty or not a number
    (the file is the user's to edit: a bad cell costs that number, never the run)."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _number(text) -> Optional[float]:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def verdict(rows: list[dict]) -> str:
    """Whether a run's numbers still improve, from its eval rows so far (newest last): KID, the local seam's
    distance from the real images', and the training loss, each against its best at an earlier preview
    (better by more than IMPROVEMENT). One phrase for the preview's log line."""
    def values(name):
        if name == "seam_gap":
            return [abs(r["seam"] - r["seam_real"]) if r.get("seam") is not None and r.get("seam_real") is not None
                    else None for r in rows]
        return [r.get(name) for r in rows]

    labels = {"kid_x1000": "KID", "seam_gap": "seam", "loss": "loss"}
    now = len(rows) - 1
    last_best = {}  # per number with a value before this preview (a log from before KID has none): its last record
    for name in IMPROVEMENT:
        series = values(name)
        first = first_index(series)
        if first is None or first == now:
            continue
        best, at = series[first], first
        for i in range(first + 1, now + 1):
            if series[i] is not None and _better(name, series[i], best):
                best, at = series[i], i
        last_best[name] = at
    if not last_best:
        return "first preview: nothing to compare with yet"
    improved = [labels[n] for n, i in last_best.items() if i == now]
    if improved:
        return f"still improving ({', '.join(improved)} at a new best)"
    since = now - max(last_best.values(), default=0)
    if since >= PATIENCE:
        return (f"no longer improving: no new best of KID, seam or loss in the last {since} previews (since step "
                f"{int(rows[now - since]['step'])}); more steps may not help")
    return f"no new best at this preview ({since} in a row; after {PATIENCE}, the run counts as no longer improving)"


def first_index(values: list) -> Optional[int]:
    """The index of the first value that is not None, or None."""
    return next((i for i, v in enumerate(values) if v is not None), None)


def _better(name: str, value: float, best: float) -> bool:
    """Whether `value` beats `best` by the margin IMPROVEMENT gives `name` (the loss's relative, the others'
    absolute): steady gains below it add up until they pass it."""
    margin = IMPROVEMENT[name] * (abs(best) if name == "loss" else 1)
    return value < best - margin


def preview_line(rows: list[dict]) -> str:
    """The log line of the newest preview: its numbers beside the real images' and the verdict."""
    r = rows[-1]
    parts = [f"seam {r['seam']:.2f} (real {r['seam_real']:.2f})"]
    if r.get("kid_x1000") is not None:
        parts.append(f"KID x1000 {r['kid_x1000']:.1f}")
    if r.get("loss") is not None:
        parts.append(f"loss {r['loss']:.4f}")
    return f"preview at step {int(r['step'])}: {', '.join(parts)}; {verdict(rows)}"


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
