"""DDPM training of the patch U-Net: one optimisation step, the run state that a new and a resumed run both
start from (`start_run`, `resume_run`), and the resumable loop (`run_loop`), in one process or data-parallel
over torchrun's ranks (distributed.py). The loss is in diffusion.py, the previews and probes in evaluation.py,
the run folder's files (its claim, logs and config.json) in run_folder.py."""
from __future__ import annotations

import copy
import dataclasses
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from patchgen.runtime.errors import ArgumentError, PatchgenError
from patchgen.runtime.files import check_free_space, write_error

from .checkpoint import load_checkpoint, load_weights, save_checkpoint
from .config import ModelConfig, TrainConfig
from . import distributed
from .data import DataSource, ImageSet, ImageSubset, holdout_split, load_named, to_model_range
from .diffusion import Coefficients, diffusion_loss, draw_batch, schedule_coefficients
from .evaluation import evaluate, preview_line, read_log
from .run_folder import CHECKPOINT_NAME, ELSEWHERE, LOG_NAMES, TrainLog, prepare_folder, run_folder
from .unet import PatchUNet

PROBE_IMAGES = 32  # held-out images for the GCC-use probe and the real seam score
HOLDOUT_SEED = 0  # fixed: the held-out evaluation images are the same for every run


def learning_rate(step: int, train_config: TrainConfig) -> float:
    """Linear warm-up to train_config.lr over train_config.warmup_steps, then constant."""
    return train_config.lr * min(1.0, (step + 1) / max(train_config.warmup_steps, 1))


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
    gen: torch.Generator  # drives data order, t, noise, patch subsets: the same stream on every rank
    step: int = 0
    ddp: Optional[torch.nn.Module] = None  # net inside DistributedDataParallel, when there are several ranks


def new_state(config: ModelConfig, train_config: TrainConfig, device: str = "cpu") -> TrainState:
    torch.manual_seed(train_config.seed)  # weight init (the same on every rank) and dropout
    net = PatchUNet(config).to(device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=train_config.lr, weight_decay=train_config.weight_decay)
    rank = distributed.world().rank
    if rank:  # each rank its own dropout stream
        torch.manual_seed(distributed.rank_seed(train_config.seed, rank, 0))
    return TrainState(net, ema, opt, torch.Generator().manual_seed(train_config.seed))


def train_step(state: TrainState, images, train_config: TrainConfig, bf16: bool = False,
               coefs: Optional[Coefficients] = None, part: slice = slice(None)) -> float:
    """One optimisation step on a random batch of train_config.batch_size `images` (uint8 [N, H, W, C], or anything
    indexed like it: an ImageSubset, a memory map); returns the loss of the images this process computed.

    part: this rank's images of the batch (`distributed.World.part`); the whole batch's randomness is drawn
    either way (`draw_batch`). With several ranks, state.ddp averages the gradients over them.
    bf16: mixed precision, convolutions and matmuls in bfloat16 under autocast (weights, optimizer and
    norms stay float32); its speed against float32 is measured in benchmarks/results/train_bf16.md.
    coefs: the schedule's coefficients on the net's device (a run builds them once); built here if not given.
    """
    device = next(state.net.parameters()).device
    config = state.net.config
    if state.ddp is None and distributed.world().size > 1:
        raise ValueError("several ranks but no state.ddp: each rank would train alone; start the run with "
                         "start_run or resume_run, which wrap the net")
    if coefs is None:
        coefs = schedule_coefficients(config.schedule, device)
    idx = torch.randint(0, len(images), (train_config.batch_size,), generator=state.gen).numpy()
    draws = draw_batch(config, train_config, train_config.batch_size, state.gen)
    x0 = torch.from_numpy(to_model_range(images[idx[part]])).to(device)
    state.net.train()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = diffusion_loss(state.ddp or state.net, x0, draws.part(part), train_config, coefs)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(state.net.parameters(), train_config.grad_clip)
    for group in state.optimizer.param_groups:
        group["lr"] = learning_rate(state.step, train_config)
    state.optimizer.step()
    ema_update(state.ema, state.net, state.step, train_config.ema_decay)
    state.step += 1
    return loss.item()


DEFAULT_CADENCE = {"checkpoint_every": 500, "preview_every": 500}  # steps; a run keeps its own across resumes


def state_dict(state: TrainState, config: ModelConfig, train_config: TrainConfig, data: DataSource,
               cadence: Optional[dict] = None, rank_rng: Optional[list] = None) -> dict:
    """What a checkpoint holds. rank_rng: every rank's torch generator state (`distributed.gather_rng_states`);
    default: this process's alone."""
    rank_rng = rank_rng or [torch.get_rng_state()]
    return {
        "cadence": dict(cadence or DEFAULT_CADENCE),
        "model_config": config.to_dict(),
        "train_config": train_config.to_dict(),
        "data": data.to_dict(),
        "step": state.step,
        "model": state.net.state_dict(),
        "ema": state.ema.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "rng": {"generator": state.gen.get_state(), "torch": rank_rng[0], "torch_ranks": rank_rng},
    }


def restore_state(ckpt: dict, device: str = "cpu") -> TrainState:
    """The state a checkpoint saved. Each rank restores its own torch generator (dropout) when the checkpoint
    has it, i.e. at the same world size or below; a rank beyond them seeds it from (seed, rank, step)."""
    state = new_state(ckpt["model_config"], ckpt["train_config"], device)
    load_weights(state.net, ckpt["model"], "weights")
    load_weights(state.ema, ckpt["ema"], "EMA weights")
    try:
        state.optimizer.load_state_dict(ckpt["optimizer"])
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise PatchgenError(f"the checkpoint's optimizer state does not match its config: "
                            f"{(str(e).splitlines() or [type(e).__name__])[0][:160]}") from None
    state.gen.set_state(ckpt["rng"]["generator"])
    state.step = ckpt["step"]
    rank, saved = distributed.world().rank, ckpt["rng"].get("torch_ranks") or [ckpt["rng"]["torch"]]
    if rank < len(saved):
        torch.set_rng_state(saved[rank])
    else:
        torch.manual_seed(distributed.rank_seed(ckpt["train_config"].seed, rank, state.step))
    return state


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


def checkpoint_bytes(state: TrainState) -> int:
    """About what a checkpoint of `state` takes on disk: the weights four times (raw, EMA, AdamW's two
    moments), plus 1 MiB for the rest."""
    params = sum(p.numel() * p.element_size() for p in state.net.parameters())
    return 4 * params + 2**20


@dataclass
class Run:
    """A run ready for `run_loop`: what `start_run` and `resume_run` both return."""
    dir: Path
    state: TrainState
    train_config: TrainConfig
    source: DataSource  # with the run's held-out split and training count
    cadence: dict  # checkpoint_every, preview_every (steps); a run keeps its own across resumes
    images: ImageSubset  # the training split of the data's uint8 [N, H, W, C] (gathered per batch, no copy)
    probe_images: np.ndarray  # up to PROBE_IMAGES held-out images (training images if none are held out)
    coefs: Coefficients  # the schedule's, on the run's device, built once
    saved_step: Optional[int]  # the step of the checkpoint on disk; None before the first
    part: slice  # this rank's images of each batch (`distributed.World.part`)

    @property
    def config(self) -> ModelConfig:
        return self.state.net.config

    @property
    def checkpoint_path(self) -> Path:
        return self.dir / CHECKPOINT_NAME


def _run(run_dir, state: TrainState, train_config: TrainConfig, source: DataSource, cadence: dict, data: ImageSet,
         saved_step: Optional[int]) -> Run:
    """Split `data` as `source` says, and check that its images fit the model."""
    config = state.net.config
    if data.images.shape[1] != config.image_size:
        raise PatchgenError(f"data images are {data.images.shape[1]}px but the model is {config.image_size}px")
    part = distributed.world().part(train_config.batch_size)  # a batch that does not split over the ranks fails here
    train_idx, held_idx = holdout_split(len(data.images), source.holdout_fraction, source.holdout_seed)
    if len(train_idx) == 0:
        raise ArgumentError(f"holding out {source.holdout_fraction:g} of {len(data.images)} image(s) leaves none to "
                            "train on; ", "lower {holdout} or add images", holdout=None)
    images = ImageSubset(data.images, train_idx)
    probe = data.images[(held_idx if len(held_idx) else train_idx)[:PROBE_IMAGES]]
    coefs = schedule_coefficients(config.schedule, next(state.net.parameters()).device)
    state.ddp = distributed.wrap(state.net)
    return Run(Path(run_dir), state, train_config, dataclasses.replace(source, num_train=len(train_idx)), cadence,
               images, probe, coefs, saved_step, part)


def start_run(run_dir, data: ImageSet, config: ModelConfig, train_config: TrainConfig, holdout: float = 0.1,
              device: str = "cpu") -> Run:
    """A new run: fresh weights from train_config.seed, `holdout` of the images held out by the fixed HOLDOUT_SEED."""
    source = dataclasses.replace(data.source, holdout_fraction=holdout, holdout_seed=HOLDOUT_SEED,
                                 image_size=config.image_size)
    return _run(run_dir, new_state(config, train_config, device), train_config, source, dict(DEFAULT_CADENCE), data,
                None)


def default_loader(source: DataSource) -> ImageSet:
    """The images a checkpoint's data source names (`load_named`), at its image size."""
    return load_named(source.name, source.image_size)


def same_data(saved: DataSource, now: DataSource, accept_changed_data: bool = False) -> DataSource:
    """The run's data source, once the images loaded for a resume (`now`) are proven to be the ones it
    trained on: their identity (`DataSource.identity`: names, sizes and times of the files, or the
    font's glyphs) is the checkpoint's. A mismatch is refused with the counts, unless accepted, in which
    case the source takes the new images' count and identity (and the held-out split, redrawn over them,
    changes). A checkpoint from before identities, or data without one, cannot be checked and passes."""
    if not saved.identity or not now.identity or saved.identity == now.identity:
        return saved
    if not accept_changed_data:
        raise ArgumentError(f"the images of {saved.name} changed since this run started: it had {saved.num_images} "
                            f"usable image(s), now {now.num_images}, and files were added, removed or rewritten; ",
                            "restore them, or pass {accept_changed_data} to train on from them as they are (its "
                            "held-out images change too)", accept_changed_data=True)
    return dataclasses.replace(saved, num_images=now.num_images, skipped=now.skipped, identity=now.identity)


def resume_run(run_dir, device: str = "cpu", data: Optional[ImageSet] = None,
               load_data: Callable[[DataSource], ImageSet] = default_loader, ckpt: Optional[dict] = None,
               accept_changed_data: bool = False) -> Run:
    """The run in `run_dir` as its checkpoint left it (or `ckpt`, already loaded from there): weights,
    optimizer, random state, configs and data source. Its images are `data`, or `load_data(source)`, and
    must be the ones it trained on (`same_data`)."""
    ckpt = ckpt or load_checkpoint(Path(run_dir) / CHECKPOINT_NAME)
    if "optimizer" not in ckpt:  # checked before any image is loaded, as is the batch's split
        raise PatchgenError("the checkpoint has no optimizer state (a slim copy, such as benchmarks/train_gpu.sh "
                            "returns): patchgen-export can export it, but a run cannot resume from it")
    distributed.world().part(ckpt["train_config"].batch_size)  # before the images load; _run keeps the slice
    if data is None and not ckpt["data"].name:
        raise PatchgenError("the checkpoint names no data set (damaged or edited?): a run resumes on the data it "
                            "started with; start a new run instead")
    data = data if data is not None else load_data(ckpt["data"])
    source = same_data(ckpt["data"], data.source, accept_changed_data)
    cadence = {**DEFAULT_CADENCE, **ckpt.get("cadence", {})}
    return _run(run_dir, restore_state(ckpt, device), ckpt["train_config"], source, cadence, data, ckpt["step"])


def checkpoint(run: Run) -> None:
    """Every rank calls it: rank 0 writes the checkpoint (with every rank's generator state) and the others
    wait until it is on disk."""
    rank_rng = distributed.gather_rng_states()
    if distributed.world().writer:
        check_free_space(run.dir, checkpoint_bytes(run.state), f"the checkpoint at step {run.state.step}", ELSEWHERE)
        save_checkpoint(run.checkpoint_path,
                        state_dict(run.state, run.config, run.train_config, run.source, run.cadence, rank_rng))
    distributed.barrier()
    run.saved_step = run.state.step


def _preview(run: Run, recent: list, count: int, steps: int, on_preview: Optional[Callable[[str], None]]) -> None:
    """Rank 0's preview at the run's step (`evaluation.evaluate`: `count` images in `steps` sampling steps),
    logged with the mean loss of the `recent` steps; on_preview(line) gets its numbers (`preview_line`)."""
    try:
        evaluate(run.dir, run.state.step, run.state.ema, run.probe_images, run.train_config.seed, run.source.name,
                 count, steps, loss=sum(recent) / len(recent) if recent else None)
    except OSError as e:
        raise write_error(e, run.dir, ELSEWHERE) from None
    if on_preview is not None:
        on_preview(preview_line(read_log(run.dir / LOG_NAMES[1])))


def run_loop(run: Run, max_steps: int, bf16: bool = False, progress: Optional[Callable] = None,
             preview_count: int = 16, preview_steps: int = 50,
             on_preview: Optional[Callable[[str], None]] = None) -> RunResult:
    """Train `run` up to `max_steps`: one train_log.csv row per step, a preview (evaluation.evaluate) every
    preview_every steps and at the end, a checkpoint every checkpoint_every steps and at the end. SIGINT or
    SIGTERM (to any rank) stops every rank after the current step, checkpointed. progress(step, loss,
    images_per_s) if given, on rank 0. Every rank calls it; rank 0 alone writes.
    At a step that both previews and checkpoints, the preview comes first: a kill between the two leaves an
    eval row past the checkpoint, which the resume drops and writes again, never a checkpoint without its row.
    on_preview(line), on rank 0: each preview's numbers and whether they still improve (`preview_line`)."""
    state, every, writer = run.state, run.cadence, distributed.world().writer
    losses, stopping = [], 0  # the signal (any rank's) that stops the run after this step
    since = 0  # index into losses of the first step since the last preview

    def preview():
        nonlocal since
        if writer:
            _preview(run, losses[since:], preview_count, preview_steps, on_preview)
        since = len(losses)
    with _StopFlag() as stop, TrainLog(run.dir / LOG_NAMES[0], writer) as log:
        while state.step < max_steps and not stopping:
            t0 = time.perf_counter()
            loss = train_step(state, run.images, run.train_config, bf16, run.coefs, run.part)
            loss, stopping = distributed.sync_step(loss, stop.signal or 0)
            losses.append(loss)
            speed = run.train_config.batch_size / (time.perf_counter() - t0)
            log.row(state.step, loss, learning_rate(state.step - 1, run.train_config), speed)
            if progress is not None and writer:
                progress(state.step, loss, speed)
            if every["preview_every"] and state.step % every["preview_every"] == 0:
                preview()
            if state.step % every["checkpoint_every"] == 0:
                checkpoint(run)
        if not stopping and every["preview_every"] and state.step % every["preview_every"]:
            preview()  # the one at the end
        if run.saved_step != state.step:
            checkpoint(run)
    return RunResult(losses, state.step, stopping or None)


def train(run_dir, max_steps: int, *, data: Optional[ImageSet] = None, config: Optional[ModelConfig] = None,
          train_config: Optional[TrainConfig] = None, holdout: float = 0.1, resume: bool = False,
          checkpoint_every: Optional[int] = None, preview_every: Optional[int] = None, preview_count: int = 16,
          preview_steps: int = 50, device: str = "cpu", bf16: bool = False,
          progress: Optional[Callable[[int, float, float], None]] = None,
          load_data: Callable[[DataSource], ImageSet] = default_loader,
          accept_changed_data: bool = False, on_preview: Optional[Callable[[str], None]] = None) -> RunResult:
    """Train (or resume) a run in `run_dir` up to `max_steps` steps; checkpoint.pt and preview PNGs go there.

    A new run needs data, config and train_config. A resumed run reads its configs and data source from the checkpoint
    (its images are `data`, or `load_data(source)`) and continues exactly: its losses equal those of an
    uninterrupted run, and its logs hold each step once. A resume already at `max_steps` returns at once and
    changes nothing. checkpoint_every / preview_every (steps; 0 = no previews): None keeps the resumed run's
    own, or DEFAULT_CADENCE for a new run. on_preview(line): each preview's numbers, said (`run_loop`).
    `device` and `bf16` (see `train_step`) are how this session
    computes, not part of the run: they may change between sessions. The run holds `run_dir` for its
    lifetime (`run_folder`): a second run into it is refused. A resume refuses images that are not the
    run's own (`same_data`) unless `accept_changed_data`.
    """
    with run_folder(run_dir, resume) as ckpt_path:
        if resume:
            ckpt = load_checkpoint(ckpt_path)
            if ckpt["step"] >= max_steps:
                return RunResult([], ckpt["step"], None)
            run = resume_run(run_dir, device, data, load_data, ckpt, accept_changed_data)
            del ckpt
        elif data is None or config is None or train_config is None:
            raise ValueError("a new run needs data, config and train_config")
        else:
            run = start_run(run_dir, data, config, train_config, holdout, device)
        given = (("checkpoint_every", checkpoint_every), ("preview_every", preview_every))
        run.cadence.update({k: v for k, v in given if v is not None})
        if run.cadence["checkpoint_every"] < 1 or run.cadence["preview_every"] < 0:
            raise ValueError(f"checkpoint_every must be >= 1 and preview_every >= 0, got {run.cadence}")
        settings = {**run.config.to_dict(), **run.train_config.to_dict(), "data": run.source.to_dict()}  # config.json
        prepare_folder(run.dir, resume, run.state.step, checkpoint_bytes(run.state), settings)
        return run_loop(run, max_steps, bf16, progress, preview_count, preview_steps, on_preview)
