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
from patchgen.models.config import ModelConfig, Option, TrainConfig, field_options, option, recipe_settings
from patchgen.runtime.limits import available_cpus
from patchgen.runtime.schedule import Schedule

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


DATA_HELP = ("'emoji' (Twemoji 72x72, CC-BY 4.0, no download), 'emoji-faces' (its smileys), 'noto-emoji' or "
             "'noto-emoji-faces' (Noto Color Emoji, native 128x128; apt-get install fonts-noto-color-emoji), or a "
             "folder of images (searched recursively; every type Pillow opens: png, jpg, gif, webp, tiff, bmp, ...).")


@dataclass(frozen=True)
class NewRun:
    """What a new run is made of: its configs and its data (--data, skin tones, the held-out fraction)."""
    config: ModelConfig
    train_config: TrainConfig
    data: str = dataclasses.field(default="emoji", metadata=option(DATA_HELP))  # a load_data name
    skin_tones: bool = dataclasses.field(default=True, metadata=option(
        "Emoji data: leave out skin-tone variants.", name="no-skin-tones"))
    holdout: float = dataclasses.field(default=0.1, metadata=option(
        "Fraction of images held out for evaluation (fixed seed).", low=0, high=0.9))


@dataclass(frozen=True)
class Setting:
    """A patchgen-train option made from a field's `Option`: which dataclass and field it sets."""
    owner: type  # NewRun, ModelConfig or TrainConfig
    field: dataclasses.Field
    option: Option

    @property
    def name(self) -> str:
        """The option's name without its dashes, e.g. image-size, no-gcc, timesteps."""
        return self.option.name or self.field.name.replace("_", "-")

    @property
    def param(self) -> str:
        """click's name for its value: image_size, no_gcc, timesteps."""
        return self.name.replace("-", "_")

    @property
    def field_default(self):
        """The default of what it sets: the field's own, or that of the field's `key` in the field's default."""
        f = self.field
        value = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        return getattr(value, self.option.key) if self.option.key else value

    @property
    def turns_off(self) -> bool:
        """A flag that sets its bool field to False (--no-gcc)."""
        return isinstance(self.field_default, bool) and self.name.startswith("no-")


def _settings() -> list[Setting]:
    """The options of a new run, made from the fields' metadata: the data's, --recipe (it chooses the defaults of
    options after it), the model's and the training's, each in field order."""
    order = {NewRun: 0, ModelConfig: 2, TrainConfig: 3}
    found = [Setting(cls, f, o) for cls in order for f, o in field_options(cls)]
    return sorted(found, key=lambda s: 1 if s.field.name == "recipe" else order[s.owner])


SETTINGS = _settings()
# What defines a run: a resumed run keeps its checkpoint's, so these are refused with --resume.
NEW_RUN_OPTIONS = tuple(s.param for s in SETTINGS if not s.option.resumable)
# A config field's name in an error, as the option that sets it; single words (halo, grid, lr) are left as they are.
FIELD_OPTIONS = {s.option.key or s.field.name: s.option.named or f"--{s.name}" for s in SETTINGS
                 if s.owner is not NewRun and "_" in (s.option.key or s.field.name)}


def _csv_ints(_ctx, _param, value):
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


def _click_option(setting: Setting):
    """The click option of one setting: a flag for a bool field, comma-separated integers for a tuple, a choice,
    or a range of ints or floats; a default of None stands for the recipe's value."""
    o, field_default = setting.option, setting.field_default
    default = field_default if o.default is ... else o.default
    if isinstance(field_default, bool):
        return click.option(f"--{setting.name}", is_flag=True, help=o.help or None)
    kind = {}
    if isinstance(field_default, tuple):
        kind, default = {"callback": _csv_ints}, ",".join(map(str, default))
    elif o.choices:
        kind = {"type": click.Choice(o.choices)}
    elif o.low is not None or o.high is not None:
        bounds = click.FloatRange if isinstance(field_default, float) else click.IntRange
        kind = {"type": bounds(o.low, o.high, min_open=o.low_open, max_open=o.high_open)}
    return click.option(f"--{setting.name}", default=default, show_default=default is not None,
                        help=o.help or None, **kind)


def _new_run_options(command):
    """Decorate `command` with the options of SETTINGS, listed in their order."""
    for setting in reversed(SETTINGS):  # click lists the options applied last first
        command = _click_option(setting)(command)
    return command


@click.command(cls=Command, epilog=EXAMPLE, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Run folder: checkpoint.pt, preview PNGs, train_log.csv, eval_log.csv.")
@click.option("--max-steps", type=click.IntRange(min=1), default=10000, show_default=True, help="Train until this many steps.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint (its configs and data are reused).")
@click.option("--accept-changed-data", is_flag=True,
              help="With --resume: train on from the data as it is now, though images were added, removed or "
                   "rewritten since the run started (without it, such a resume is refused).")
@_new_run_options
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
              help="torch CPU threads, at most the CPUs this process may use [default: torch's choice: one per "
                   "core, or $OMP_NUM_THREADS, which torchrun sets to 1 per rank; on 2 cores it trained 1.84x faster "
                   "than 1 thread when quiet, 0.90x beside a competing load: benchmarks/results/train_threads.md].")
@click.option("--bf16", is_flag=True, help="Mixed precision (bfloat16 autocast): faster on CPUs with AVX512-BF16/AMX and on GPUs.")
@user_errors
def main(out, max_steps, resume, accept_changed_data, checkpoint_every, preview_every, device, cache_dir, no_cache,
         decode_workers, threads, bf16, **settings):
    """Train a patch-based diffusion U-Net (Arakawa et al. 2023) and write checkpoints to --out."""
    from patchgen.models import distributed
    from patchgen.models.run_folder import check_run_folder, run_folder

    check_run_folder(out, resume)  # before any data is loaded
    _refuse_contradictions(resume, accept_changed_data, cache_dir, no_cache)
    if threads:
        import torch

        torch.set_num_threads(threads)
    new_run = None if resume else _new_run(settings)
    world = distributed.World()
    if distributed.launched_by_torchrun():
        world, device = distributed.init(device)
    else:
        distributed.check_device(device)
    try:
        with run_folder(out, resume):  # created, claimed and checked writable before any image is decoded
            if new_run is not None:
                world.part(new_run.train_config.batch_size)
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


def _refuse_contradictions(resume, accept_changed_data, cache_dir, no_cache) -> None:
    """Options that contradict each other, or a resumed run's checkpoint, as one CliError line."""
    if accept_changed_data and not resume:
        raise CliError("--accept-changed-data applies to --resume only")
    context = click.get_current_context()
    given = [name for name in NEW_RUN_OPTIONS if context.get_parameter_source(name) is not ParameterSource.DEFAULT]
    if resume and given:
        raise CliError(f"{', '.join('--' + n.replace('_', '-') for n in given)}: only for a new run; --resume "
                       f"continues with its checkpoint's configuration and data, so drop "
                       f"{'them' if len(given) > 1 else 'it'} (or start a new run in another --out)")
    if no_cache and cache_dir is not None:
        raise CliError("--cache-dir and --no-cache contradict each other: pass one of them")


def _new_run(settings: dict) -> NewRun:
    """A new run's configs and data from the values of its options (SETTINGS, by click's names): the recipe's
    value where an option was left at None; an invalid combination is one CliError line."""
    values = {cls: {} for cls in (NewRun, ModelConfig, TrainConfig)}
    for s in SETTINGS:
        value = not settings[s.param] if s.turns_off else settings[s.param]
        if s.option.key:  # a field of the field's dataclass (the schedule's kind and T)
            values[s.owner].setdefault(s.field.name, {})[s.option.key] = value
        else:
            values[s.owner][s.field.name] = value
    model, training = values[ModelConfig], values[TrainConfig]
    chosen = recipe_settings(training["recipe"], model["image_size"], model["grid"],
                             max(len(model["channel_mults"]), 1), use_gcc=model["use_gcc"])
    for name, value in chosen.items():
        fields = model if name in model else training
        fields[name] = value if fields[name] is None else fields[name]
    model["use_position"] = model["use_position"] and model["grid"] > 1  # a 1x1 grid has a single position
    try:
        config = ModelConfig(**{**model, "schedule": Schedule(**model["schedule"])})
        train_config = TrainConfig(**training)
    except ValueError as e:
        raise CliError(_in_option_names(str(e))) from None
    return NewRun(config, train_config, **values[NewRun])


def _in_option_names(message: str) -> str:
    """A ModelConfig/TrainConfig error with each field name that is an identifier (global_context, channel_mults)
    written as the option that sets it (FIELD_OPTIONS); single words (halo, grid, lr) read as they are."""
    return re.sub(r"\b(" + "|".join(sorted(FIELD_OPTIONS, key=len, reverse=True)) + r")\b",
                  lambda m: FIELD_OPTIONS[m.group(1)], message)


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
    from patchgen.models.data import load_named
    from patchgen.models.train import train

    say = _speaker(world)
    if world.size > 1:
        say(f"data-parallel on {world.size} ranks")

    def load_for(source):
        say(f"loading {source.name} images at {source.image_size}px ...")
        return _in_rank_order(world, decoding, lambda: load_named(source.name, source.image_size, decoding))

    new_run_inputs = {} if new_run is None else _new_run_inputs(world, decoding, new_run, say)
    with contextlib.ExitStack() as stack:
        bar = None

        def report(step, loss_value, speed):
            nonlocal bar
            if bar is None:  # shown from the first step on: an error before it comes without a stray label
                bar = stack.enter_context(progress(max_steps, "training", "steps", show_pos=True, info=True,
                                                   start=step - 1))
            bar.update(step - bar.pos, f"loss {loss_value:.4f}  {speed:.1f} img/s")

        def on_preview(line):  # below a terminal's bar, which redraws itself at the next step
            say(("\n" if bar is not None and sys.stderr.isatty() else "") + line)

        t0 = time.perf_counter()
        result = train(out, max_steps, resume=resume, progress=report, load_data=load_for, on_preview=on_preview,
                       **options, **new_run_inputs)
    _report(world, out, max_steps, result, time.perf_counter() - t0, say)


def _speaker(world):
    """say(message): a line on stderr from rank 0; the other ranks stay quiet."""
    def say(message):
        if world.writer:
            click.echo(message, err=True)
    return say


def _new_run_inputs(world, decoding, new_run: NewRun, say) -> dict:
    """`train`'s arguments for a new run: its images (loaded in rank order) and its configs."""
    from patchgen.models.data import load_data

    size = new_run.config.image_size
    say(f"loading {new_run.data} images at {size}px ...")
    images = _in_rank_order(world, decoding, lambda: load_data(new_run.data, size, new_run.skin_tones, decoding))
    if images.source.attribution:
        say(f"data: {images.source.attribution}")
    say(f"data: {len(images.images)} images ({images.source.skipped} skipped: unreadable or without "
        "a faithful RGB form)")
    return dict(data=images, config=new_run.config, train_config=new_run.train_config, holdout=new_run.holdout)


def _report(world, out, max_steps, result, seconds: float, say) -> None:
    """What training did, on rank 0; an interrupted run then exits with 128 + the signal, rank 0 first."""
    done = len(result.losses)
    if done == 0 and result.interrupted_by is None:
        say(f"nothing to do: the checkpoint in {out} is at step {result.step} and --max-steps is {max_steps}; "
            "nothing was changed (raise --max-steps to train on)")
        return
    say(f"{done} step{'s' * (done != 1)} in {seconds:.0f} s; checkpoint at step {result.step}: "
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
