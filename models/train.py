"""DDPM training of the patch U-Net: a loss function, one optimisation step, and the resumable loop."""
from __future__ import annotations

import copy
import csv
import io
import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from patchgen.runtime.images import make_grid, save_png, to_uint8
from patchgen.runtime.layout import pool_gcc, to_patches
from patchgen.runtime.errors import PatchgenError
from patchgen.runtime.files import atomic_output, remove_stale_temporaries

from .checkpoint import load_checkpoint, save_checkpoint
from .config import ModelConfig, TrainConfig
from .data import ImageSet, holdout_split, to_model_range
from .metrics import seam_grid, seam_score
from .diffusion import (loss_weight, patch_inputs, predict_full, prediction_target, q_sample,
                        schedule_coefficients, select_patches, x0_from_prediction)
from .sample import sample_torch
from .unet import PatchUNet

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAMES = ("train_log.csv", "eval_log.csv")  # one row per step / per preview step, up to the checkpoint's step
# What a run writes atomically, as glob patterns: the temporaries a killed run left are removed at the next start.
ATOMIC_OUTPUTS = (CHECKPOINT_NAME, "preview_*.png", "config.json", *LOG_NAMES)
PROBE_IMAGES = 32  # held-out images for the GCC-use probe and the real seam score
HOLDOUT_SEED = 0  # fixed: the held-out evaluation images are the same for every run


def gcc_input(net: PatchUNet, x_t, t, gen: torch.Generator) -> Optional[torch.Tensor]:
    """The GCC the network sees during training [B, C, P, P], or None.

    gcc_source "xt" pools x_t (the paper). "x0" is self-conditioning: on half the
    steps GCC is zeros (the first sampling step), on the other half it pools a
    no-grad first estimate x0_hat made with zero GCC over all patches.
    """
    config = net.config
    if not config.use_gcc:
        return None
    if config.gcc_source == "xt":
        return pool_gcc(x_t, config.patch_size)
    p = config.patch_size
    gcc = torch.zeros(x_t.shape[0], config.channels, p, p, device=x_t.device)
    if torch.rand((), generator=gen) < 0.5:
        with torch.no_grad():
            coefs = schedule_coefficients(config.schedule)
            pred = predict_full(net, x_t, t, gcc)
            x0_hat = x0_from_prediction(config.prediction, pred, x_t, t, *(c.to(x_t.device) for c in coefs))
            gcc = pool_gcc(x0_hat.clamp(-1, 1), p)
    return gcc


def diffusion_loss(net: PatchUNet, x0: torch.Tensor, gen: torch.Generator, tc: TrainConfig) -> torch.Tensor:
    """One Monte-Carlo estimate of the DDPM loss on the patches of x0 [B, C, H, W] (values in [-1, 1])."""
    config, dev = net.config, x0.device
    sqrt_abar, sqrt_1m_abar = (c.to(dev) for c in schedule_coefficients(config.schedule))
    b, g2 = x0.shape[0], config.grid**2
    t = torch.randint(0, config.schedule.num_timesteps, (b,), generator=gen).to(dev)
    noise = torch.randn(x0.shape, generator=gen).to(dev)
    x_t = q_sample(x0, t, noise, sqrt_abar, sqrt_1m_abar)
    gcc = gcc_input(net, x_t, t, gen)
    if 0 < tc.patches_per_image < g2:  # a random subset of positions per image
        index = torch.rand(b, g2, generator=gen).argsort(dim=1)[:, : tc.patches_per_image].to(dev)
    else:
        index = torch.arange(g2, device=dev).expand(b, -1)
    k = index.shape[1]
    patches, pos, gcc_p = patch_inputs(config, x_t, gcc, index)
    target = prediction_target(config.prediction, x0, noise, t, sqrt_abar, sqrt_1m_abar)
    target = select_patches(to_patches(target, config.grid), index)  # the centre P x P of each window
    tp = t.repeat_interleave(k)
    pred = net(patches, tp, pos, gcc_p)
    err = (pred - target).abs() if tc.loss == "l1" else (pred - target) ** 2
    w = loss_weight(config.prediction, tc.loss_weighting, tp, sqrt_abar, sqrt_1m_abar, tc.min_snr_gamma)
    return (w * err.mean(dim=(1, 2, 3))).mean()


def learning_rate(step: int, tc: TrainConfig) -> float:
    """Linear warm-up to tc.lr over tc.warmup_steps, then constant."""
    return tc.lr * min(1.0, (step + 1) / max(tc.warmup_steps, 1))


@torch.no_grad()
def ema_update(ema: PatchUNet, net: PatchUNet, step: int, decay: float) -> None:
    """ema <- d ema + (1 - d) net, with d warmed up as min(decay, (1 + step) / (10 + step))."""
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), net.parameters()):
        e.lerp_(p, 1 - d)


@dataclass
class TrainState:
    net: PatchUNet
    ema: PatchUNet
    optimizer: torch.optim.Optimizer
    gen: torch.Generator  # drives data order, t, noise, patch subsets
    step: int = 0


def new_state(config: ModelConfig, tc: TrainConfig, device: str = "cpu") -> TrainState:
    torch.manual_seed(tc.seed)  # weight init and dropout
    net = PatchUNet(config).to(device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    return TrainState(net, ema, opt, torch.Generator().manual_seed(tc.seed))


def train_step(state: TrainState, images: np.ndarray, tc: TrainConfig, bf16: bool = False) -> float:
    """One optimisation step on a random batch of `images` (uint8 [N, H, W, C]); returns the loss.

    bf16: mixed precision, convolutions and matmuls in bfloat16 under autocast (weights, optimizer and
    norms stay float32); its speed against float32 is measured in benchmarks/results/train_bf16.md.
    """
    device = next(state.net.parameters()).device
    idx = torch.randint(0, len(images), (tc.batch_size,), generator=state.gen).numpy()
    x0 = torch.from_numpy(to_model_range(images[idx])).to(device)
    state.net.train()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = diffusion_loss(state.net, x0, state.gen, tc)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(state.net.parameters(), tc.grad_clip)
    for group in state.optimizer.param_groups:
        group["lr"] = learning_rate(state.step, tc)
    state.optimizer.step()
    ema_update(state.ema, state.net, state.step, tc.ema_decay)
    state.step += 1
    return loss.item()


DEFAULT_CADENCE = {"checkpoint_every": 500, "preview_every": 500}  # steps; a run keeps its own across resumes


def state_dict(state: TrainState, config: ModelConfig, tc: TrainConfig, data: dict,
               cadence: Optional[dict] = None) -> dict:
    return {
        "cadence": dict(cadence or DEFAULT_CADENCE),
        "model_config": config.to_dict(),
        "train_config": tc.to_dict(),
        "data": data,
        "step": state.step,
        "model": state.net.state_dict(),
        "ema": state.ema.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "rng": {"generator": state.gen.get_state(), "torch": torch.get_rng_state()},
    }


def restore_state(ckpt: dict, device: str = "cpu") -> TrainState:
    state = new_state(ckpt["model_config"], ckpt["train_config"], device)
    state.net.load_state_dict(ckpt["model"])
    state.ema.load_state_dict(ckpt["ema"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.gen.set_state(ckpt["rng"]["generator"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    state.step = ckpt["step"]
    return state


def write_preview(path: Path, net: PatchUNet, count: int, steps: int, seed: int, data: dict) -> np.ndarray:
    """A grid of `count` samples, patch by patch through the runtime's sampling loop (DDIM, eta = 0)."""
    images = to_uint8(sample_torch(net, count, seed=seed, steps=steps))
    save_png(path, make_grid(images), {"patchgen:seed": str(seed), "patchgen:data": data.get("name", "")})
    return images


EVAL_COLUMNS = ["step", "seam", "seam_real", "swap_increase_0_300", "swap_increase_300_700",
                "swap_increase_700_1000", "mse_true_gcc_700_1000"]


def evaluate(run_dir: Path, state: TrainState, probe_images: np.ndarray, tc: TrainConfig, source: dict,
             count: int, steps: int) -> dict:
    """Preview grid, its seam score next to real images', and the GCC-use probe; one row of eval_log.csv."""
    config = state.ema.config
    samples = write_preview(run_dir / f"preview_{state.step:07d}.png", state.ema, count, steps, tc.seed, source)
    row = {"step": state.step, "seam": seam_score(samples, seam_grid(config.grid)),
           "seam_real": seam_score(probe_images, seam_grid(config.grid))}
    device = next(state.ema.parameters()).device
    for band in gcc_probe(state.ema, torch.from_numpy(to_model_range(probe_images)).to(device)):
        key = band["band"].replace("-", "_")
        row[f"swap_increase_{key}"] = band["swap_increase"]
        if key.endswith("_1000"):
            row["mse_true_gcc_700_1000"] = band["mse_true_gcc"]
    path = run_dir / LOG_NAMES[1]
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, EVAL_COLUMNS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: (f"{v:.5g}" if isinstance(v, float) else v) for k, v in row.items()})
    return row


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints after the current step and returns."""

    def __init__(self):
        self.signal: Optional[int] = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._set)
            except ValueError:  # not the main thread: signals stay with the caller
                pass
        return self

    def _set(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class RunResult:
    losses: list  # the loss of every step this call ran (none: a resume already at max_steps changed nothing)
    step: int  # the step count the checkpoint holds
    interrupted_by: Optional[int]  # the signal number that stopped the run early, if any


def check_run_folder(run_dir, resume: bool) -> Path:
    """The run's checkpoint path, once `run_dir` fits the request: a resume needs the checkpoint, a new run
    must not overwrite one. Cheap and writes nothing, so callers can fail before loading any data."""
    ckpt_path = Path(run_dir) / CHECKPOINT_NAME
    if resume and not ckpt_path.is_file():
        raise PatchgenError(f"checkpoint {ckpt_path} does not exist: nothing to resume; "
                            "leave out --resume to start a new run there")
    if not resume and ckpt_path.exists():
        raise PatchgenError(f"{ckpt_path} already exists: pass --resume to continue it or choose a new --out")
    return ckpt_path


def truncate_log(path: Path, step: int) -> None:
    """Keep a CSV log's header and its rows up to `step` (the checkpoint's), rewritten atomically.

    A run killed after its last checkpoint has logged steps beyond it, which the resumed run logs again.
    A row the kill cut short has fewer fields and goes too.
    """
    if not path.exists():
        return
    with open(path, newline="") as f:
        header, *rows = list(csv.reader(f)) or [[]]
    kept = [r for r in rows if len(r) == len(header) and r[0].isdigit() and int(r[0]) <= step]
    if len(kept) == len(rows):
        return
    text = io.StringIO()
    csv.writer(text).writerows([header, *kept])
    with atomic_output(path) as f:
        f.write(text.getvalue().encode())


def train(run_dir, max_steps: int, *, data: Optional[ImageSet] = None, config: Optional[ModelConfig] = None,
          tc: Optional[TrainConfig] = None, holdout: float = 0.1, resume: bool = False,
          checkpoint_every: Optional[int] = None, preview_every: Optional[int] = None, preview_count: int = 16,
          preview_steps: int = 50, device: str = "cpu", bf16: bool = False,
          progress: Optional[Callable[[int, float, float], None]] = None,
          load_data: Optional[Callable[[dict], ImageSet]] = None) -> RunResult:
    """Train (or resume) a run in `run_dir` up to `max_steps` steps; checkpoint.pt and preview PNGs go there.

    A resumed run reads its configs and data description from the checkpoint
    (`load_data` rebuilds the images from it) and continues exactly: its losses
    equal those of an uninterrupted run, and its logs hold each step once. A resume already at
    `max_steps` returns at once and changes nothing. checkpoint_every / preview_every (steps; 0 = no
    previews): None keeps the resumed run's own, or DEFAULT_CADENCE for a new run. `device` and `bf16` (see `train_step`) are how this
    session computes, not part of the run: they may change between sessions.
    """
    run_dir = Path(run_dir)
    ckpt_path = check_run_folder(run_dir, resume)
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        if ckpt["step"] >= max_steps:
            return RunResult([], ckpt["step"], None)
        cadence = {**DEFAULT_CADENCE, **ckpt.get("cadence", {})}
        config, tc, source = ckpt["model_config"], ckpt["train_config"], ckpt["data"]
        if data is None:
            data = load_data(source)
        state = restore_state(ckpt, device)
        del ckpt
    else:
        if data is None or config is None or tc is None:
            raise ValueError("a new run needs data, config and tc")
        source = {**data.source, "holdout_fraction": holdout, "holdout_seed": HOLDOUT_SEED,
                  "image_size": config.image_size}
        state = new_state(config, tc, device)
        cadence = dict(DEFAULT_CADENCE)
    train_idx, held_idx = holdout_split(len(data.images), source["holdout_fraction"], source["holdout_seed"])
    source["num_train"] = len(train_idx)
    images = data.images[train_idx]
    probe_images = data.images[(held_idx if len(held_idx) else train_idx)[:PROBE_IMAGES]]
    if images.shape[1] != config.image_size:
        raise PatchgenError(f"data images are {images.shape[1]}px but the model is {config.image_size}px")

    cadence.update({k: v for k, v in (("checkpoint_every", checkpoint_every), ("preview_every", preview_every))
                    if v is not None})
    checkpoint_every, preview_every = cadence["checkpoint_every"], cadence["preview_every"]
    if checkpoint_every < 1 or preview_every < 0:
        raise ValueError(f"checkpoint_every must be >= 1 and preview_every >= 0, got {cadence}")
    run_dir.mkdir(parents=True, exist_ok=True)
    for pattern in ATOMIC_OUTPUTS:
        remove_stale_temporaries(run_dir, pattern)
    for name in LOG_NAMES:  # a resume continues the logs from its checkpoint's step; a new run starts them anew
        if resume:
            truncate_log(run_dir / name, state.step)
        else:
            (run_dir / name).unlink(missing_ok=True)
    if not resume:
        with atomic_output(run_dir / "config.json") as f:
            f.write((json.dumps({**config.to_dict(), **tc.to_dict(), "data": source}, indent=1, default=str)
                     + "\n").encode())

    saved_step = state.step if resume else None

    def checkpoint():
        nonlocal saved_step
        save_checkpoint(ckpt_path, state_dict(state, config, tc, source, cadence))
        saved_step = state.step

    def preview():
        evaluate(run_dir, state, probe_images, tc, source, preview_count, preview_steps)

    # At a step that both previews and checkpoints, the preview comes first: a kill between the two leaves an
    # eval row past the checkpoint, which the resume drops and writes again, never a checkpoint without its row.
    losses = []
    with _StopFlag() as stop, open(run_dir / LOG_NAMES[0], "a", newline="") as log:
        writer = csv.writer(log)
        if log.tell() == 0:
            writer.writerow(["step", "loss", "lr", "images_per_s"])
        while state.step < max_steps and stop.signal is None:
            t0 = time.perf_counter()
            loss = train_step(state, images, tc, bf16)
            speed = tc.batch_size / (time.perf_counter() - t0)
            losses.append(loss)
            writer.writerow([state.step, f"{loss:.6f}", f"{learning_rate(state.step - 1, tc):.3e}", f"{speed:.2f}"])
            log.flush()
            if progress is not None:
                progress(state.step, loss, speed)
            if preview_every and state.step % preview_every == 0:
                preview()
            if state.step % checkpoint_every == 0:
                checkpoint()
        if stop.signal is None and preview_every and state.step % preview_every:
            preview()  # the one at the end
        if saved_step != state.step:
            checkpoint()
    return RunResult(losses, state.step, stop.signal)


NOISE_BANDS = ((0, 300), (300, 700), (700, 1000))  # t in per mille of T; eval columns keep these names for any T


@torch.no_grad()
def gcc_probe(net: PatchUNet, x0: torch.Tensor, seed: int = 0) -> list[dict]:
    """Does the network use GCC? Per noise band, the x0_hat error with the true GCC and with another
    image's GCC (the batch rolled by one). A coherent model must lose accuracy at high noise when its GCC
    is swapped: the layout is decided there. Fixed noise (from `seed`) makes runs comparable over time."""
    config = net.config
    if not config.use_gcc:
        return []
    was_training = net.training
    net.eval()
    gen = torch.Generator().manual_seed(seed)
    coefs = [c.to(x0.device) for c in schedule_coefficients(config.schedule)]
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
