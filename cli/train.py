"""`patchgen-train`: train a patch U-Net on images (Twemoji built in, or any folder)."""
from __future__ import annotations

import contextlib
import dataclasses
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click
from click.core import ParameterSource

from patchgen.models.cache import CACHE_ENV  # plain constants: no torch import
from patchgen.models.config import (DEFAULT_RECIPE, LOSS_WEIGHTINGS, LOSSES, MAX_BASE_WIDTH, MAX_BATCH_SIZE, MAX_LR,
                                    MAX_RES_BLOCKS, RECIPE_LR, RECIPES, ModelConfig, TrainConfig, recipe_settings)
from patchgen.runtime.limits import available_cpus
from patchgen.runtime.schedule import MAX_TIMESTEPS, SCHEDULE_KINDS, min_timesteps
from patchgen.runtime.spec import GCC_SOURCES, MAX_IMAGE_SIZE, PREDICTIONS

from .common import CliError, Command, progress, user_errors

EXIT_GRACE_S = 5.0  # how long the other ranks of a stopped run wait for rank 0 to exit first

EXAMPLE = """
\b
Examples (the default recipe: x0-prediction, a global context vector, a halo of about a quarter patch):
  patchgen-train --data my_images/ --image-size 64 --max-steps 2000 --out runs/mine   # your own folder
  patchgen-train --out runs/mine --resume --max-steps 4000                            # continue it
  patchgen-train --data emoji-faces --image-size 32 --grid 2 --max-steps 200 --out runs/faces32
  patchgen-train --data emoji-faces --recipe paper --out runs/paper   # Arakawa et al.'s model, as published
\b
Data-parallel on 2 processes (the same run, --batch-size split between them; README: "Training on several
processes"):
  torchrun --standalone --nproc-per-node 2 -m patchgen.cli.train --data emoji --image-size 32 --out runs/emoji32x2
"""


# What defines a run: a resumed run keeps its checkpoint's, so these are refused with --resume.
NEW_RUN_OPTIONS = ("recipe", "data", "image_size", "grid", "no_gcc", "no_position", "batch_size", "base_width", "channel_mults",
                   "num_res_blocks", "attention_resolutions", "dropout", "prediction", "gcc_source", "global_context",
                   "halo", "edge_mask",
                   "schedule", "timesteps", "loss", "loss_weighting", "patches_per_image", "lr", "warmup_steps",
                   "ema_decay", "seed", "no_skin_tones", "holdout")


def _csv_ints(_ctx, _param, value):
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


@click.command(cls=Command, epilog=EXAMPLE, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--data", default="emoji", show_default=True, help="'emoji' (Twemoji 72x72, CC-BY 4.0, no download), 'emoji-faces' (its smileys), "
              "'noto-emoji' or 'noto-emoji-faces' (Noto Color Emoji, native 128x128; apt-get install fonts-noto-color-emoji), "
              "or a folder of images (searched recursively; every type Pillow opens: png, jpg, gif, webp, tiff, bmp, ...).")
@click.option("--image-size", type=click.IntRange(4, MAX_IMAGE_SIZE), default=64, show_default=True, help="Image side in pixels.")
@click.option("--grid", type=click.IntRange(min=1), default=2, show_default=True, help="G: patches per side (1 = full-image DDPM).")
@click.option("--no-gcc", is_flag=True, help="Ablation: no Global Content Conditioning.")
@click.option("--no-position", is_flag=True, help="Ablation: no position conditioning.")
@click.option("--max-steps", type=click.IntRange(min=1), default=10000, show_default=True, help="Train until this many steps.")
@click.option("--batch-size", type=click.IntRange(1, MAX_BATCH_SIZE), default=16, show_default=True,
              help="Images per step, over all ranks: under torchrun each of N ranks computes batch/N of them (a "
                   "multiple of N).")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Run folder: checkpoint.pt, preview PNGs, train_log.csv, eval_log.csv.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint (its configs and data are reused).")
@click.option("--accept-changed-data", is_flag=True,
              help="With --resume: train on from the data as it is now, though images were added, removed or "
                   "rewritten since the run started (without it, such a resume is refused).")
@click.option("--base-width", type=click.IntRange(8, MAX_BASE_WIDTH), default=32, show_default=True, help="U-Net channels at the first level (multiple of 8).")
@click.option("--channel-mults", default="1,2,2", show_default=True, callback=_csv_ints, help="Width multiplier per U-Net level.")
@click.option("--num-res-blocks", type=click.IntRange(1, MAX_RES_BLOCKS), default=2, show_default=True)
@click.option("--attention-resolutions", default="8", show_default=True, callback=_csv_ints, help="Feature-map sizes with self-attention.")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True)
@click.option("--recipe", type=click.Choice(RECIPES), default=DEFAULT_RECIPE, show_default=True,
              help="The defaults of --prediction, --global-context, --halo and --lr. patchgen: x0, a global vector of "
                   "4x4 cells, a halo of about P/4 (P = image size / grid), 5e-4: the shipped models' recipe "
                   "(benchmarks/results/recipe.md). paper: Arakawa et al. 2023's model: eps, none, 0, 2e-4.")
@click.option("--prediction", type=click.Choice(PREDICTIONS), default=None,
              help="Network target (the ONNX graph always outputs eps) [default: the recipe's, x0 or eps].")
@click.option("--gcc-source", type=click.Choice(GCC_SOURCES), default="xt", show_default=True, help="Pool x_t (paper) or the previous x0 estimate (self-conditioning).")
@click.option("--global-context", type=click.IntRange(min=0), default=None,
              help="Cells per side of a global context vector from GCC, 0 = off [default: the recipe's, 4 (or the "
                   "largest divisor of P below it) or 0].")
@click.option("--halo", type=click.IntRange(min=0), default=None,
              help="M: each patch also sees M pixels of its neighbours per side ((P+2M)^2 window, zero-padded at "
                   "the image's edge) and predicts its own P x P; P and P+2M must divide by 2^(levels-1) "
                   "[default: the recipe's: the multiple of 2^(levels-2) nearest P/4, or 0 (the paper)].")
@click.option("--edge-mask", is_flag=True, help="One more input channel marking the image against the padding "
              "beyond its edge; needs --halo and position conditioning.")
@click.option("--schedule", type=click.Choice(SCHEDULE_KINDS), default="cosine", show_default=True)
@click.option("--timesteps", type=click.IntRange(2, MAX_TIMESTEPS), default=1000, show_default=True,
              help=f"T. Sampling starts from pure noise, which needs T >= {min_timesteps('cosine')} (cosine) or "
                   f">= {min_timesteps('linear')} (linear).")
@click.option("--loss", type=click.Choice(LOSSES), default="l1", show_default=True)
@click.option("--loss-weighting", type=click.Choice(LOSS_WEIGHTINGS), default="none", show_default=True)
@click.option("--patches-per-image", type=click.IntRange(min=0), default=0, show_default=True, help="Random patches per image per step (0 = all).")
@click.option("--lr", type=click.FloatRange(0, MAX_LR, min_open=True), default=None,
              help=f"AdamW's learning rate after the warm-up [default: the recipe's, {RECIPE_LR['patchgen']:g} or "
                   f"{RECIPE_LR['paper']:g}].")
@click.option("--warmup-steps", type=click.IntRange(min=0), default=200, show_default=True)
@click.option("--ema-decay", type=click.FloatRange(0, 1), default=0.999, show_default=True)
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True)
@click.option("--no-skin-tones", is_flag=True, help="Emoji data: leave out skin-tone variants.")
@click.option("--holdout", type=click.FloatRange(0, 0.9), default=0.1, show_default=True, help="Fraction of images held out for evaluation (fixed seed).")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=None, help="Steps between checkpoints [default: 500, or the resumed run's].")
@click.option("--preview-every", type=click.IntRange(min=0), default=None, help="Steps between preview grids, and one at the end, 0 = none [default: 500, or the resumed run's].")
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu or cuda (under torchrun, "
              "each rank takes the GPU of its local rank).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help=f"Image cache: images are decoded once into an array file there that every rank and every "
                   f"resume maps read-only [default: ${CACHE_ENV}/images, else $XDG_CACHE_HOME/patchgen/images, "
                   f"else ~/.cache/patchgen/images].")
@click.option("--no-cache", is_flag=True, help="Decode the images into memory in every process instead.")
@click.option("--decode-workers", type=click.IntRange(min=1), default=None,
              help="Processes that decode the images [default: this machine's CPUs over its ranks].")
@click.option("--threads", type=click.IntRange(1, available_cpus()), default=None,
              help="torch CPU threads, at most the CPUs this process may use [default: torch's choice].")
@click.option("--bf16", is_flag=True, help="Mixed precision (bfloat16 autocast): faster on CPUs with AVX512-BF16/AMX and on GPUs.")
@user_errors
def main(recipe, data, image_size, grid, no_gcc, no_position, max_steps, batch_size, out, resume, accept_changed_data,
         base_width, channel_mults, num_res_blocks, attention_resolutions, dropout, prediction, gcc_source, global_context,
         halo, edge_mask, schedule, timesteps, loss, loss_weighting, patches_per_image, lr, warmup_steps, ema_decay, seed,
         no_skin_tones, holdout, checkpoint_every, preview_every, device, cache_dir, no_cache, decode_workers, threads,
         bf16):
    """Train a patch-based diffusion U-Net (Arakawa et al. 2023) and write checkpoints to --out."""
    from patchgen.models import distributed
    from patchgen.models.run_folder import check_run_folder, run_folder

    check_run_folder(out, resume)  # before any data is loaded
    if accept_changed_data and not resume:
        raise CliError("--accept-changed-data applies to --resume only")
    given = [name for name in NEW_RUN_OPTIONS
             if click.get_current_context().get_parameter_source(name) is not ParameterSource.DEFAULT]
    if resume and given:
        raise CliError(f"{', '.join('--' + n.replace('_', '-') for n in given)}: only for a new run; --resume "
                       f"continues with its checkpoint's configuration and data, so drop {'them' if len(given) > 1 else 'it'} (or start a new "
                       f"run in another --out)")
    if no_cache and cache_dir is not None:
        raise CliError("--cache-dir and --no-cache contradict each other: pass one of them")
    if threads:
        import torch

        torch.set_num_threads(threads)
    new_run = None
    if not resume:
        config, tc = _new_run_settings(recipe, image_size, grid, no_gcc, no_position, batch_size, base_width,
                                       channel_mults, num_res_blocks, attention_resolutions, dropout, prediction,
                                       gcc_source, global_context, halo, edge_mask, schedule, timesteps, loss,
                                       loss_weighting, patches_per_image, lr, warmup_steps, ema_decay, seed)
        new_run = NewRun(config, tc, data, not no_skin_tones, holdout)
    world = distributed.World()
    if distributed.launched_by_torchrun():
        world, device = distributed.init(device)
    else:
        distributed.check_device(device)
    try:
        with run_folder(out, resume):  # created, claimed and checked writable before any image is decoded
            if new_run is not None:
                world.part(batch_size)
            _train(world, out, resume, max_steps, new_run, _decoding(world, cache_dir, no_cache, decode_workers),
                   checkpoint_every=checkpoint_every, preview_every=preview_every, device=device, bf16=bf16,
                   accept_changed_data=accept_changed_data)
    except RuntimeError as e:
        if not distributed.peer_gone(e):
            raise
        raise CliError(f"rank {world.rank} stopped: another rank of this run ended first (its message says "
                       "why)") from None
    finally:
        distributed.shutdown()


@dataclass(frozen=True)
class NewRun:
    """What a new run is made of: its configs and its data (--data, skin tones, the held-out fraction)."""
    config: ModelConfig
    tc: TrainConfig
    data: str
    skin_tones: bool
    holdout: float


def _new_run_settings(recipe, image_size, grid, no_gcc, no_position, batch_size, base_width, channel_mults,
                      num_res_blocks, attention_resolutions, dropout, prediction, gcc_source, global_context, halo,
                      edge_mask, schedule, timesteps, loss, loss_weighting, patches_per_image, lr, warmup_steps,
                      ema_decay, seed):
    """(ModelConfig, TrainConfig) of a new run: the recipe's settings where an option was not given; an invalid
    combination is one CliError line."""
    from patchgen.runtime.schedule import Schedule

    chosen = recipe_settings(recipe, image_size, grid, max(len(channel_mults), 1), use_gcc=not no_gcc)
    given = {"prediction": prediction, "global_context": global_context, "halo": halo, "lr": lr}
    prediction, global_context, halo, lr = (chosen[k] if v is None else v for k, v in given.items())
    try:
        config = ModelConfig(
            image_size=image_size, grid=grid, base_width=base_width, channel_mults=channel_mults,
            num_res_blocks=num_res_blocks, attention_resolutions=attention_resolutions, dropout=dropout,
            use_position=not no_position and grid > 1, use_gcc=not no_gcc, global_context=global_context,
            gcc_source=gcc_source, prediction=prediction, schedule=Schedule(kind=schedule, num_timesteps=timesteps),
            halo=halo, edge_mask=edge_mask)
        tc = TrainConfig(batch_size=batch_size, patches_per_image=patches_per_image, lr=lr,
                         warmup_steps=warmup_steps, ema_decay=ema_decay, loss=loss,
                         loss_weighting=loss_weighting, seed=seed, recipe=recipe)
    except ValueError as e:
        raise CliError(_in_option_names(str(e))) from None
    return config, tc


# A config field's name in an error, as the option that sets it (the others: the same with dashes).
FIELD_OPTIONS = {"use_gcc": "GCC (on unless --no-gcc)", "use_position": "position conditioning (--no-position)",
                 "num_timesteps": "--timesteps"}


def _in_option_names(message: str) -> str:
    """A ModelConfig/TrainConfig error with each field name that is an identifier (global_context, channel_mults)
    written as the option that sets it; single words (halo, grid, lr) read as they are."""
    fields = [f.name for cls in (ModelConfig, TrainConfig) for f in dataclasses.fields(cls) if "_" in f.name]
    options = {name: FIELD_OPTIONS.get(name, f"--{name.replace('_', '-')}") for name in [*fields, *FIELD_OPTIONS]
               if name in FIELD_OPTIONS or name in NEW_RUN_OPTIONS}
    return re.sub(r"\b(" + "|".join(sorted(options, key=len, reverse=True)) + r")\b",
                  lambda m: options[m.group(1)], message)


def _decoding(world, cache_dir, no_cache, workers):
    """How this rank decodes images: into the cache (default folder unless --cache-dir), or into memory
    (--no-cache); in `workers` processes (default: one per CPU of this rank's share of the machine), with a
    progress bar. Only rank 0 talks."""
    from patchgen.models.cache import default_cache_dir
    from patchgen.models.decoding import Decoding
    from patchgen.models.distributed import local_world_size

    bar = reporter = None

    def report(done, total):
        nonlocal bar, reporter
        if bar is None:
            bar = progress(total, "decoding images", "images", show_pos=True)
            reporter = bar.__enter__()
        reporter.update(done - reporter.pos)
        if done == total:
            bar.__exit__(None, None, None)
            bar = None

    def note(message):
        click.echo(message, err=True)
    talk = world.writer
    return Decoding(None if no_cache else (cache_dir or default_cache_dir()),
                    workers or max(1, available_cpus() // local_world_size()), report if talk else None,
                    note if talk else None)


def _in_rank_order(world, decoding, load):
    """load() with the image cache: rank 0 first (it builds the entry, which a cache folder shared by several
    machines then holds), then each machine's local rank 0 (it builds the entry of a machine's own folder),
    then the other ranks, which map it. Every rank waits at the same two barriers. Without a cache, at once."""
    from patchgen.models import distributed

    if decoding.cache_dir is None:
        return load()
    phase = 0 if world.rank == 0 else (1 if world.local_rank == 0 else 2)
    data = None
    for step in range(3):
        if step == phase:
            data = load()
        if step < 2:
            distributed.barrier()
    return data


def _train(world, out, resume, max_steps, new_run, decoding, **options):
    """Load the images (in rank order), train, and report on rank 0."""
    from patchgen.models.data import load_data, load_named
    from patchgen.models.train import train

    def say(message):
        if world.writer:
            click.echo(message, err=True)

    if world.size > 1:
        say(f"data-parallel on {world.size} ranks")

    def load_for(source):
        say(f"loading {source.name} images at {source.image_size}px ...")
        return _in_rank_order(world, decoding, lambda: load_named(source.name, source.image_size, decoding))

    kwargs = {}
    if new_run is not None:
        size = new_run.config.image_size
        say(f"loading {new_run.data} images at {size}px ...")
        images = _in_rank_order(world, decoding, lambda: load_data(new_run.data, size, new_run.skin_tones, decoding))
        if images.source.attribution:
            say(f"data: {images.source.attribution}")
        say(f"data: {len(images.images)} images ({images.source.skipped} skipped: unreadable or without "
            "a faithful RGB form)")
        kwargs = dict(data=images, config=new_run.config, tc=new_run.tc, holdout=new_run.holdout)
    with contextlib.ExitStack() as stack:
        bar = None

        def report(step, loss_value, speed):
            nonlocal bar
            if bar is None:  # shown from the first step on: an error before it comes without a stray label
                bar = stack.enter_context(progress(max_steps, "training", "steps", show_pos=True, info=True,
                                                   start=step - 1))
            bar.update(step - bar.pos, f"loss {loss_value:.4f}  {speed:.1f} img/s")

        t0 = time.perf_counter()
        def on_preview(line):  # below a terminal's bar, which redraws itself at the next step
            say(("\n" if bar is not None and sys.stderr.isatty() else "") + line)

        result = train(out, max_steps, resume=resume, progress=report, load_data=load_for, on_preview=on_preview,
                       **options, **kwargs)
    done = len(result.losses)
    if done == 0 and result.interrupted_by is None:
        say(f"nothing to do: the checkpoint in {out} is at step {result.step} and --max-steps is {max_steps}; "
            "nothing was changed (raise --max-steps to train on)")
        return
    say(f"{done} step{'s' * (done != 1)} in {time.perf_counter() - t0:.0f} s; checkpoint at step {result.step}: "
        f"{out / 'checkpoint.pt'}")
    if result.interrupted_by is not None:
        say("interrupted: checkpoint saved; continue with --resume")
        _exit_after_rank0(world, 128 + result.interrupted_by)


def _exit_after_rank0(world, code: int) -> None:
    """Exit with `code` on every rank, rank 0 first. torchrun ends all workers once one has exited with an
    error; rank 0's report (above) is out before any rank leaves the barrier, and the others wait a grace
    period, so the failure torchrun names is rank 0's own exit code, not a SIGTERM it sent."""
    from patchgen.models import distributed

    distributed.barrier()
    if not world.writer:
        time.sleep(EXIT_GRACE_S)
    raise SystemExit(code)


if __name__ == "__main__":
    main()
