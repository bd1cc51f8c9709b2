"""`patchgen-sample`: generate images from a patchgen ONNX model, patch by patch, under a memory budget.

Edge path: imports only numpy, onnxruntime, pillow and click (never torch).
"""
from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path

import click

from patchgen.runtime.generate import MAX_SEED
from patchgen.runtime.limits import available_cpus
from patchgen.runtime.loop import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS
from patchgen.runtime.memory import DEFAULT_BUDGET_SHARE
from patchgen.runtime.model import default_threads
from patchgen.runtime.edit import IMG2IMG_STRENGTH, MAX_JUMPS
from patchgen.runtime.pretrained import DEFAULT_MODEL, shipped_models
from patchgen.runtime.session import DEFAULT_PROVIDER, available_providers

from .common import CliError, Command, as_option, one_line, progress, user_errors
from .report import SampleRecord, reported, sample_record

EXAMPLE = """
\b
Examples:
  patchgen-sample --num-images 16 --grid-image samples.png       # the shipped smileys model
  patchgen-sample --model faces64_1x1 --sampler ddim             # a shipped model by name; DDIM 50
  patchgen-sample --model noto128_4x4 -n 16 --out samples128 --grid-image grid128.png   # 128x128, 4x4
  patchgen-sample --model emoji32.onnx --steps 10 --seed 7 --out samples/
  patchgen-sample --model emoji32.onnx --memory-budget 150M      # the fastest setup that peaks within 150M
  patchgen-sample --memory-budget min                             # the smallest peak (one patch per call)
  patchgen-sample --provider cuda                                 # a Jetson's GPU (onnxruntime-gpu)
  patchgen-sample --init-img face.png --strength 0.6              # img2img: a variation of face.png
  patchgen-sample --init-img face.png --mask mask.png             # inpaint the mask's white pixels
  patchgen-sample --init-img face.png --outpaint right:1          # move left one patch, paint the right
  patchgen-sample -n 16 --grid-image grid.png --preview live.png  # watch x0 form in any image viewer
  patchgen-sample -n 4 --report run.json                          # the run as JSON, for scripts
"""
STEPS_HELP = ("Sampler steps [default: ddpm every timestep (the model's T), "
              + ", ".join(f"{k} {v}" for k, v in DEFAULT_STEPS.items()) + ", at most T].")


def check_output_folder(folder: Path) -> None:
    """Fail before any work when `folder` could not be created or written; creates nothing."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CliError(f"cannot create output folder {folder}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CliError(f"cannot write to {existing}; choose a writable --out folder")


@click.command(cls=Command, epilog=EXAMPLE, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--model", "model_path", default=None,
              help=f"An .onnx file from patchgen-export, or a shipped model: {', '.join(shipped_models()) or 'none'}. "
                   f"[default: {DEFAULT_MODEL}]")
@click.option("-n", "--num-images", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True,
              help="Image i depends only on (seed, i).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help=STEPS_HELP)
@click.option("--sampler", type=click.Choice(SAMPLERS), default=None,
              help=f"[default: {DEFAULT_SAMPLER}; ddim with --eta or --repaint-jumps, which need it]")
@click.option("--eta", type=click.FloatRange(0, 1), default=None,
              help="DDIM only: its noise, 0 = deterministic, 1 = DDPM's posterior [default: 0].")
@click.option("--patch-batch", type=click.IntRange(min=1), default=None,
              help="Exactly this many patches per onnxruntime call, memory-first, nothing measured [default: the "
                   "planner's choice].")
@click.option("--memory-budget", default=None,
              help="Peak RSS limit such as 200M or 1.5G: the fastest setup (patch batch, allocation) whose peak "
                   f"fits it; 'min' for the smallest peak. It bounds the host's memory, not a GPU's. [default: "
                   f"{DEFAULT_BUDGET_SHARE:.0%} of the memory this process can have]")
@click.option("--threads", type=click.IntRange(1, available_cpus()), default=None,
              help=f"onnxruntime intra-op threads [default: the fastest the planner measures, 1 to the CPUs this "
                   f"process may use ({available_cpus()}); with --memory-budget min or --patch-batch, "
                   f"{default_threads()}: those CPUs, at most 4].")
@click.option("--provider", default=DEFAULT_PROVIDER, show_default=True,
              help=f"onnxruntime execution provider; this build has: {', '.join(available_providers())}.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("samples"), show_default=True, help="Folder for the PNGs.")
@click.option("--grid-image", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also write all images as one grid PNG.")
@click.option("--init-img", "init_img", type=click.Path(path_type=Path), default=None,
              help="Edit this image instead of drawing from noise: img2img (SDEdit), or with --mask or --outpaint, "
                   "inpainting. Centre-cropped and resized to the model's size.")
@click.option("--strength", type=float, default=None,
              help=f"With --init-img: how much to change, in (0, 1]; the last floor(steps x strength) steps run "
                   f"[default: {IMG2IMG_STRENGTH} for img2img, 1 with --mask or --outpaint].")
@click.option("--mask", type=click.Path(path_type=Path), default=None,
              help="With --init-img: white = paint, black = keep (thresholded at half). Kept pixels come out "
                   "exactly as the input's; patches with no white pixel make no network call.")
@click.option("--outpaint", default=None, metavar="SIDE:K",
              help="With --init-img: move the image K patches away from SIDE (left, right, up, down) and paint "
                   "the freed patches, e.g. right:1.")
@click.option("--repaint-jumps", type=click.IntRange(0, MAX_JUMPS), default=0, show_default=True,
              help="With --mask or --outpaint (ddim, ddpm): RePaint's resampling, each step taken N + 1 times so "
                   "the painted pixels fit the kept ones better, at N + 1 times the cost.")
@click.option("--preview", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the current estimate of the images (the grid's, with --grid-image) to this PNG as "
                   "they form, atomically; the final images are unchanged by it.")
@click.option("--preview-every", type=click.IntRange(min=1), default=1, show_default=True,
              help="Steps between --preview writes.")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write a JSON record of the run to this file, for scripts: the model and its hash, the plan, "
                   "the kernel's peak RSS, seconds, the files written, or what stopped it (fields: the docstring of "
                   "patchgen.cli.report). Written as the run ends, done or not; replaced only with --force.")
@click.option("--force", is_flag=True, help="Replace files that an earlier run wrote under the same names: images, "
              "--grid-image, --preview, --report (without it, such a run is refused before any work).")
@user_errors
def main(model_path, num_images, seed, steps, sampler, eta, patch_batch, memory_budget, threads, provider, out_dir,
         grid_image, init_img, strength, mask, outpaint, repaint_jumps, preview, preview_every, report, force):
    """Generate images with a patch-based diffusion model: the U-Net denoises one patch per call,
    so peak memory follows the patch batch, not the image size."""
    from patchgen.runtime.pretrained import resolve_model

    # Everything is checked, and memory planned, before the first folder or file is created.
    beside = {"--grid-image": grid_image, "--preview": preview, "--report": report}  # the files beside the images
    check_output_folder(out_dir)
    if preview_every != 1 and preview is None:
        raise CliError("--preview-every needs --preview, the file to write")
    check_beside(out_dir, beside)
    model_file = resolve_model(model_path)
    # No output may replace an input: the model (and its weights), --init-img, --mask; not even with --force.
    check_inputs(model_file, {"--init-img": init_img, "--mask": mask}, beside, out_dir, seed, num_images)
    check_outputs(out_dir, seed, num_images, beside, force)  # nor an earlier run's, without --force
    run = SampleRecord(model_file, out_dir, num_images, seed, sampler, steps, eta)
    with reported(report, functools.partial(sample_record, run)):
        model, plan = _plan(run, threads, provider, memory_budget, patch_batch, grid_image, preview,
                            (init_img, mask, strength, outpaint, repaint_jumps))
        _run(run, model, plan, grid_image, preview, preview_every)


def check_beside(out_dir: Path, beside: dict) -> None:
    """One CliError line, before any work, where a file beside the images (option -> path, None: not asked
    for) has no folder to go to, or two of them share a path."""
    from patchgen.runtime.files import check_writable_folder

    given = [(option, path) for option, path in beside.items() if path is not None]
    for option, path in given:
        if os.path.realpath(path.parent) == os.path.realpath(out_dir):
            continue  # in --out, which the run creates
        if not path.parent.is_dir():
            raise CliError(f"{option} {path}: its folder {path.parent} does not exist; create it, or put the file "
                           "in --out")
        check_writable_folder(path.parent)
    for k, (option, path) in enumerate(given):
        for other, taken in given[:k]:
            if os.path.realpath(path) == os.path.realpath(taken):
                raise CliError(f"{option} {path} is the {other} too; choose another name for one of them")


def check_inputs(model_file: Path, inputs: dict, beside: dict, out_dir: Path, seed: int, num_images: int) -> None:
    """One CliError line where an output would replace an input (option -> path, None skipped): the model file
    or its weights, --init-img or --mask, by a file beside the images or by one of the images."""
    inputs = {option: path for option, path in inputs.items() if path is not None}
    for option, path in beside.items():
        if path is None:
            continue
        if _is_input(path, model_file):
            raise CliError(f"{option} {path} is the model file (or its weights); choose another path")
        if _is_sample(path, out_dir, seed, num_images):
            raise CliError(f"{option} {path} is one of this run's own PNGs, which would overwrite it or it "
                           "them; choose another name")
        for name, source in inputs.items():
            if _same_file(path, source):
                raise CliError(f"{option} {path} is the {name}, which it would overwrite; choose another path")
    for name, source in inputs.items():
        if _is_sample(source, out_dir, seed, num_images):
            raise CliError(f"{name} {source} is one of the PNGs this run writes, which would overwrite it; "
                           "choose another --out or --seed, or copy it first")


def _plan(run: SampleRecord, threads, provider, memory_budget, patch_batch, grid_image, preview, edit_args):
    """Open the model, read the edit's images and plan the run (each stage recorded in `run`, for its report);
    say their notes. edit_args: make_edit's (init image, mask, strength, outpaint, repaint jumps)."""
    from patchgen.runtime.edit import make_edit
    from patchgen.runtime.generate import make_plan
    from patchgen.runtime.images import grid_memory
    from patchgen.runtime.memory import given_budget
    from patchgen.runtime.model import load_model

    run.stage = "loading"
    model = run.model = load_model(run.model_file, threads, provider, memory_budget)
    run.stage = "editing"
    edit, edit_phrases = make_edit(model.spec, *edit_args, given_budget(memory_budget))
    edit_notes = tuple(note.worded(as_option) for note in edit_phrases)
    c, h, w = model.spec.image_shape
    held = grid_memory(run.num_images, h, w, c) if grid_image else 0
    preview_held, preview_per_image = _preview_memory(preview, grid_image, run.num_images, model.spec.image_shape)
    run.stage = "planning"
    plan = run.plan = make_plan(model, run.num_images, run.seed, run.sampler, run.steps, run.eta,
                                memory_budget=memory_budget, patch_batch=patch_batch,
                                held_bytes=held + preview_held, held_per_image=preview_per_image, edit=edit)
    if edit is not None and plan.request.steps_run == 0:
        edit_notes += (f"--strength {edit.strength:g} of {plan.request.steps} steps runs none: the images are the "
                       "input",)
    for note in model.notes + edit_notes + plan.notes:
        click.echo(f"note: {note}", err=True)
    run.stage = "sampling"
    return model, plan


def _run(run: SampleRecord, model, plan, grid_image, preview, preview_every) -> None:
    """Make --out and sample into it. A run stopped or failed before its first image leaves no folder it made;
    one stopped says what it wrote."""
    from patchgen.runtime.files import check_writable_folder, made_folder, remove_if_empty

    out_dir, made = made_folder(run.out_dir)
    try:
        check_writable_folder(out_dir)
        _sample(model, plan, run, grid_image, preview, preview_every)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (common.Terminated): say what is on disk, then stop as usual
        remove_if_empty(made)
        report = _stopped_report(run.images, run.num_images, run.seed, out_dir, grid_image)
        click.echo(("\n" if sys.stderr.isatty() else "") + report, err=True)  # below a terminal's bar
        raise
    except BaseException:
        remove_if_empty(made)  # a run that wrote no image leaves no folder behind
        raise


def existing_outputs(out_dir: Path, seed: int, num_images: int, *paths) -> list[Path]:
    """The files this run would replace: its images seed<S>_<i>.png in out_dir (one listing of the folder, not
    one lookup per image), and any of `paths` (the grid, the preview; None skipped) that exists."""
    found = []
    try:
        with os.scandir(out_dir) as entries:
            names = [e.name for e in entries]
    except (FileNotFoundError, NotADirectoryError):
        names = []
    for name in sorted(names):
        if _sample_name(name, seed, num_images):  # the name itself: a link there would be replaced, not followed
            found.append(out_dir / name)
    return found + [p for p in paths if p is not None and os.path.lexists(p)]


def check_outputs(out_dir: Path, seed: int, num_images: int, beside: dict, force: bool) -> None:
    """One CliError line, before any work, where an output's name is taken: by a folder (even with --force), or
    by a file an earlier run wrote (without --force). beside: option -> path of the files beside the images
    (None: not asked for). The advice names the option that chooses that name."""
    found = existing_outputs(out_dir, seed, num_images, *beside.values())
    folders = [p for p in found if p.is_dir() and not p.is_symlink()]
    if folders:
        raise CliError(f"{folders[0]} is a folder, where this run writes a file; move it or choose another "
                       f"{_naming_option(folders[0], beside)}")
    if found and not force:
        which = (f"{found[0]} already exists and this run would replace it" if len(found) == 1
                 else f"{found[0]} and {len(found) - 1} more exist and this run would replace them")
        raise CliError(f"{which}: pass --force to replace, or choose another {_naming_option(found[0], beside)}")


def _naming_option(path: Path, beside: dict) -> str:
    """The option(s) that would give `path`, one of the run's outputs, another name."""
    return next((option for option, given in beside.items() if given is not None and path == given),
                "--out or --seed")


def _preview_memory(preview, grid_image, num_images, image_shape) -> tuple[int, int]:
    """(bytes held through the run, bytes per image in flight) of writing previews: the uint8 images and their
    float temporaries per image in flight, and a canvas to encode (the whole grid's with --grid-image)."""
    from patchgen.runtime.images import grid_memory

    if preview is None:
        return 0, 0
    c, h, w = image_shape
    per_image = 3 * 4 * c * h * w  # to_uint8's float temporaries and its output
    if grid_image is not None:
        return grid_memory(num_images, h, w, c), per_image
    return 0, per_image + grid_memory(1, h, w, c)


def _is_input(path: Path, model_path: Path) -> bool:
    """Whether writing `path` would replace the model file or one of its external-data files."""
    from patchgen.runtime.onnxfile import external_data_files

    try:
        inputs = [model_path, *(model_path.parent / name for name in external_data_files(model_path))]
    except (OSError, ValueError):
        inputs = [model_path]
    return path.exists() and any(p.exists() and path.samefile(p) for p in inputs)


def _same_file(a: Path, b: Path) -> bool:
    """Whether paths a and b name one existing file (by inode: links and relative paths included)."""
    try:
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return False


def _is_sample(path: Path, out_dir: Path, seed: int, num_images: int) -> bool:
    """Whether `path`, or the file it links to, is where this run writes one of its images (seed<S>_<index>.png
    in out_dir)."""
    path = Path(os.path.realpath(path))
    return path.parent == Path(os.path.realpath(out_dir)) and _sample_name(path.name, seed, num_images)


def _sample_name(name: str, seed: int, num_images: int) -> bool:
    """Whether `name` is one of this run's image names, seed<S>_<index>.png with index < num_images."""
    index = name.removeprefix(f"seed{seed}_").removesuffix(".png")
    return name == f"seed{seed}_{index}.png" and index.isdigit() and len(index) == 5 and int(index) < num_images


def _sample(model, plan, run: SampleRecord, grid_image, preview=None, preview_every=1) -> None:
    """Sample the plan's images into run.out_dir (and the grid), with a progress bar and a closing line; each
    file is recorded in `run` as it is written, and the sampling time once done."""
    from patchgen.runtime.generate import iter_samples, png_text
    from patchgen.runtime.images import new_grid, paste_into_grid, save_png
    from patchgen.runtime.memory import format_size, peak_rss

    _remove_stale_temporaries(run.out_dir, grid_image, preview)
    for line in _header(model, plan):
        click.echo(line, err=True)
    c, h, w = model.spec.image_shape
    request, n = plan.request, run.num_images
    grid = new_grid(n, h, w, c) if grid_image is not None else None  # filled as images arrive
    live = new_grid(n, h, w, c) if grid is not None and preview is not None else None
    show = None if preview is None else Preview(preview, live, preview_every, request.steps_run, run.beside)
    runs = -(-n // plan.images_per_run)
    t0 = time.perf_counter()
    label = "sampling" if runs == 1 else f"sampling ({runs} runs of {request.steps_run} steps)"  # the total is theirs
    with progress(runs * request.steps_run, label, unit="steps") as bar:
        for index, image in iter_samples(model, plan, callback=lambda i, t: bar.update(1), on_x0=show):
            save_png(run.image_path(index), image, png_text(model, request, index))
            run.images.append(index)
            for canvas in (grid, live):
                if canvas is not None:
                    paste_into_grid(canvas, index, image)
    run.sampling_seconds = elapsed = time.perf_counter() - t0
    if grid is not None:
        save_png(grid_image, grid, png_text(model, request, -1))
        run.beside.append(grid_image)
    click.echo(f"wrote {n} image(s) to {run.out_dir}" + (f" and {grid_image}" if grid_image else "")
               + f"; {elapsed / n:.3g} s/image, peak RSS {format_size(peak_rss())}", err=True)


def _remove_stale_temporaries(out_dir: Path, *paths) -> None:
    """Remove what killed runs left where this one writes: in out_dir and beside each of `paths` (None skipped)."""
    from patchgen.runtime.files import remove_stale_temporaries

    remove_stale_temporaries(out_dir, "seed*_*.png")
    for path in paths:
        if path is not None:
            remove_stale_temporaries(path.parent, path.name)


def _header(model, plan) -> list[str]:
    """The lines that open a run on stderr, for people: the model and the plan, the edit, the model's data."""
    from patchgen.runtime.memory import format_size

    spec, request = model.spec, plan.request
    lines = [f"{model.path.name} on {model.provider}: {spec.image_size}x{spec.image_size}, {spec.grid}x{spec.grid} "
             f"patches of {spec.patch_size}px" + (f" seen through {spec.window_size}px windows (halo {spec.halo})"
                                                  if spec.halo else "")
             + f"; {request.sampler} {request.steps} steps" + (f" (eta {request.eta:g})" if request.eta is not None
                                                               else "")
             + f"; {plan.patch_batch} patch(es) per call, {plan.images_per_run} image(s) per run, {plan.allocation} "
             f"allocation, {model.threads} thread(s)"
             + (f"; predicted peak {format_size(plan.predicted_peak)} of the "
                + ("default " if plan.default_budget else "") + f"budget {format_size(plan.budget)}"
                if plan.predicted_peak else "")
             + (f", {plan.seconds_per_step(spec.grid):.3g} s/step" if plan.seconds_per_patch else "")]
    edit = request.edit
    if edit is not None:
        lines.append(f"{edit.kind} at strength {edit.strength:g}: {request.steps_run} of {request.steps} steps"
                     + (f", {edit.masked_patches(spec.grid)} of {spec.grid**2} patches painted (the others make no "
                        "call)" if edit.keep is not None else "")
                     + (f", {edit.jumps} RePaint jump(s) per step" if edit.jumps else ""))
    if model.metadata.get("patchgen.data.attribution"):
        lines.append(f"model trained on: {model.metadata['patchgen.data.attribution']}")
    return lines


class Preview:
    """iter_samples' on_x0: writes the run's x0_hat to `path` every `every` steps and at the last (in the grid's
    cells with --grid-image: `live`), atomically. A write that fails is said once, then no more are tried; the
    first that succeeds adds `path` to `written`."""

    def __init__(self, path: Path, live, every: int, steps_run: int, written: list):
        self.path, self.live, self.every, self.steps_run, self.written = path, live, every, steps_run, written
        self.failed = False

    def __call__(self, first: int, i: int, x0) -> None:
        from patchgen.runtime.errors import PatchgenError
        from patchgen.runtime.images import make_grid, paste_into_grid, save_png, to_uint8

        if self.failed or (i + 1) % self.every and i + 1 != self.steps_run:
            return
        images = to_uint8(x0)
        if self.live is not None:
            for k, image in enumerate(images):
                paste_into_grid(self.live, first + k, image)
        try:  # a side output: a full disk there must not cost the run its images
            save_png(self.path, make_grid(images) if self.live is None else self.live,
                     {"patchgen:step": str(i + 1), "Software": "patchgen"})
        except (PatchgenError, OSError) as e:
            self.failed = True
            click.echo(f"\nnote: no more previews: {one_line(str(e))}", err=True)
            return
        if self.path not in self.written:
            self.written.append(self.path)


def _stopped_report(written: list[int], num_images: int, seed: int, out_dir: Path, grid_image) -> str:
    """What an interrupted run leaves: how many images, where, which, and how to finish (image i depends only on
    (seed, i), so a rerun writes the same ones again)."""
    if not written:
        return f"stopped before the first of {num_images} image(s) was written"
    first, last = min(written), max(written)
    names = f"seed{seed}_{first:05d}.png" + (f" to seed{seed}_{last:05d}.png" if last != first else "")
    return (f"stopped: {len(written)} of {num_images} image(s) written to {out_dir} ({names})"
            + (f", no {grid_image}" if grid_image else "") + "; the same command with --force makes them all")


if __name__ == "__main__":
    main()
