"""`patchgen-sample`: generate images from a patchgen ONNX model, patch by patch, under a memory budget.

Edge path: imports only numpy, onnxruntime, pillow and click (never torch).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click

from patchgen.runtime.generate import MAX_SEED
from patchgen.runtime.limits import available_cpus
from patchgen.runtime.loop import DEFAULT_STEPS, SAMPLERS
from patchgen.runtime.memory import DEFAULT_BUDGET_SHARE
from patchgen.runtime.model import default_threads
from patchgen.runtime.edit import IMG2IMG_STRENGTH, MAX_JUMPS
from patchgen.runtime.pretrained import DEFAULT_MODEL, shipped_models
from patchgen.runtime.session import DEFAULT_PROVIDER, available_providers

from .common import CliError, Command, one_line, progress, user_errors

EXAMPLE = """
\b
Examples:
  patchgen-sample --num-images 16 --grid-image samples.png       # the shipped smileys model
  patchgen-sample --model faces64_1x1 --sampler dpm++            # a shipped model by name
  patchgen-sample --model noto128_4x4 -n 16 --out samples128 --grid-image grid128.png   # 128x128, 4x4
  patchgen-sample --model emoji32.onnx --sampler dpm++ --steps 20 --seed 7 --out samples/
  patchgen-sample --model emoji32.onnx --memory-budget 150M      # the fastest setup that peaks within 150M
  patchgen-sample --memory-budget min                             # the smallest peak (one patch per call)
  patchgen-sample --provider cuda                                 # a Jetson's GPU (onnxruntime-gpu)
  patchgen-sample --init-img face.png --strength 0.6              # img2img: a variation of face.png
  patchgen-sample --init-img face.png --mask mask.png             # inpaint the mask's white pixels
  patchgen-sample --init-img face.png --outpaint right:1          # move left one patch, paint the right
  patchgen-sample -n 16 --grid-image grid.png --preview live.png  # watch x0 form in any image viewer
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
@click.option("--sampler", type=click.Choice(SAMPLERS), default="ddim", show_default=True)
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
@click.option("--force", is_flag=True, help="Replace images that an earlier run wrote under the same names "
              "(without it, such a run is refused before any work).")
@user_errors
def main(model_path, num_images, seed, steps, sampler, eta, patch_batch, memory_budget, threads, provider, out_dir,
         grid_image, init_img, strength, mask, outpaint, repaint_jumps, preview, preview_every, force):
    """Generate images with a patch-based diffusion model: the U-Net denoises one patch per call,
    so peak memory follows the patch batch, not the image size."""
    from patchgen.runtime.edit import make_edit
    from patchgen.runtime.memory import given_budget
    from patchgen.runtime.files import check_writable_folder, made_folder, remove_if_empty
    from patchgen.runtime.generate import make_plan
    from patchgen.runtime.images import grid_memory
    from patchgen.runtime.model import load_model
    from patchgen.runtime.pretrained import resolve_model

    # Everything is checked, and memory planned, before the first folder or file is created.
    check_output_folder(out_dir)
    if preview_every != 1 and preview is None:
        raise CliError("--preview-every needs --preview, the file to write")
    for option, path in (("--grid-image", grid_image), ("--preview", preview)):
        if path is None or os.path.realpath(path.parent) == os.path.realpath(out_dir):
            continue  # none, or in --out, which the run creates
        if not path.parent.is_dir():
            raise CliError(f"{option} {path}: its folder {path.parent} does not exist; create it, or put the file "
                           "in --out")
        check_writable_folder(path.parent)
    if grid_image is not None and preview is not None and os.path.realpath(grid_image) == os.path.realpath(preview):
        raise CliError(f"--preview {preview} is the --grid-image too; choose another name for one of them")
    model_file = resolve_model(model_path)
    # No output may replace an input: the model (and its weights), --init-img, --mask; not even with --force.
    inputs = [(option, path) for option, path in (("--init-img", init_img), ("--mask", mask)) if path is not None]
    for option, path in (("--grid-image", grid_image), ("--preview", preview)):
        if path is None:
            continue
        if _is_input(path, model_file):
            raise CliError(f"{option} {path} is the model file (or its weights); choose another path")
        if _is_sample(path, out_dir, seed, num_images):
            raise CliError(f"{option} {path} is one of this run's own PNGs, which would overwrite it or it "
                           "them; choose another name")
        for name, source in inputs:
            if _same_file(path, source):
                raise CliError(f"{option} {path} is the {name}, which it would overwrite; choose another path")
    for name, source in inputs:
        if _is_sample(source, out_dir, seed, num_images):
            raise CliError(f"{name} {source} is one of the PNGs this run writes, which would overwrite it; "
                           "choose another --out or --seed, or copy it first")
    check_outputs(out_dir, seed, num_images, grid_image, preview, force)  # nor an earlier run's, without --force
    model = load_model(model_file, threads, provider, memory_budget)
    edit, edit_notes = make_edit(model.spec, init_img, mask, strength, outpaint, repaint_jumps,
                                 given_budget(memory_budget))
    c, h, w = model.spec.image_shape
    held = grid_memory(num_images, h, w, c) if grid_image else 0
    preview_held, preview_per_image = _preview_memory(preview, grid_image, num_images, model.spec.image_shape)
    plan = make_plan(model, num_images, seed, sampler, steps, eta, memory_budget=memory_budget,
                     patch_batch=patch_batch, held_bytes=held + preview_held, held_per_image=preview_per_image,
                     edit=edit)
    if edit is not None and plan.request.steps_run == 0:
        edit_notes += (f"--strength {edit.strength:g} of {plan.request.steps} steps runs none: the images are the "
                       "input",)
    for note in model.notes + edit_notes + plan.notes:
        click.echo(f"note: {note}", err=True)
    out_dir, made = made_folder(out_dir)
    written = []  # the indices of the images on disk
    try:
        check_writable_folder(out_dir)
        _sample(model, plan, seed, num_images, out_dir, grid_image, preview, preview_every, written)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (common.Terminated): say what is on disk, then stop as usual
        remove_if_empty(made)
        report = _stopped_report(written, num_images, seed, out_dir, grid_image)
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


def check_outputs(out_dir: Path, seed: int, num_images: int, grid_image, preview, force: bool) -> None:
    """One CliError line, before any work, where an output's name is taken: by a folder (even with --force), or
    by a file an earlier run wrote (without --force). The advice names the option that chooses that name."""
    found = existing_outputs(out_dir, seed, num_images, grid_image, preview)
    folders = [p for p in found if p.is_dir() and not p.is_symlink()]
    if folders:
        raise CliError(f"{folders[0]} is a folder, where this run writes a file; move it or choose another "
                       f"{_naming_option(folders[0], grid_image, preview)}")
    if found and not force:
        which = (f"{found[0]} already exists and this run would replace it" if len(found) == 1
                 else f"{found[0]} and {len(found) - 1} more exist and this run would replace them")
        raise CliError(f"{which}: pass --force to replace, or choose another "
                       f"{_naming_option(found[0], grid_image, preview)}")


def _naming_option(path: Path, grid_image, preview) -> str:
    """The option(s) that would give `path`, one of the run's outputs, another name."""
    if path == grid_image:
        return "--grid-image"
    if path == preview:
        return "--preview"
    return "--out or --seed"


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


def _sample(model, plan, seed, num_images, out_dir, grid_image, preview=None, preview_every=1, written=None):
    """Sample the plan's images into out_dir (and the grid), with a progress bar and a closing report; the index
    of each image on disk is appended to `written` as it is written."""
    from patchgen.runtime.files import remove_stale_temporaries
    from patchgen.runtime.generate import iter_samples, png_text
    from patchgen.runtime.images import make_grid, new_grid, paste_into_grid, save_png, to_uint8
    from patchgen.runtime.errors import PatchgenError
    from patchgen.runtime.memory import format_size, peak_rss

    written = [] if written is None else written
    remove_stale_temporaries(out_dir, "seed*_*.png")  # left by a killed run
    for path in (grid_image, preview):
        if path is not None:
            remove_stale_temporaries(path.parent, path.name)

    spec, request = model.spec, plan.request
    click.echo(f"{model.path.name} on {model.provider}: {spec.image_size}x{spec.image_size}, {spec.grid}x{spec.grid} patches of "
               f"{spec.patch_size}px" + (f" seen through {spec.window_size}px windows (halo {spec.halo})"
                                         if spec.halo else "") + f"; {request.sampler} {request.steps} steps"
               + (f" (eta {request.eta:g})" if request.eta is not None else "") + f"; {plan.patch_batch} patch(es) per "
               f"call, {plan.images_per_run} image(s) per run, {plan.allocation} allocation, {model.threads} thread(s)"
               + (f"; predicted peak {format_size(plan.predicted_peak)} of the "
                  + ("default " if plan.default_budget else "") + f"budget {format_size(plan.budget)}"
                  if plan.predicted_peak else "")
               + (f", {plan.seconds_per_step(spec.grid):.3g} s/step" if plan.seconds_per_patch else ""), err=True)
    edit = request.edit
    if edit is not None:
        click.echo(f"{edit.kind} at strength {edit.strength:g}: "
                   f"{request.steps_run} of {request.steps} steps"
                   + (f", {edit.masked_patches(spec.grid)} of {spec.grid**2} patches painted (the others make no "
                      "call)" if edit.keep is not None else "")
                   + (f", {edit.jumps} RePaint jump(s) per step" if edit.jumps else ""), err=True)
    if model.metadata.get("patchgen.data.attribution"):
        click.echo(f"model trained on: {model.metadata['patchgen.data.attribution']}", err=True)

    c, h, w = spec.image_shape
    runs = -(-num_images // plan.images_per_run)
    grid = new_grid(num_images, h, w, c) if grid_image is not None else None  # filled as images arrive
    live = new_grid(num_images, h, w, c) if grid is not None and preview is not None else None
    steps_run = request.steps_run

    failed = []  # a preview that could not be written: said once, then no more tried

    def show(first, i, x0):  # the preview: the run's x0_hat, in the grid's cells with --grid-image
        if failed or (i + 1) % preview_every and i + 1 != steps_run:
            return
        images = to_uint8(x0)
        if live is not None:
            for k, image in enumerate(images):
                paste_into_grid(live, first + k, image)
        try:  # a side output: a full disk there must not cost the run its images
            save_png(preview, make_grid(images) if live is None else live,
                     {"patchgen:step": str(i + 1), "Software": "patchgen"})
        except (PatchgenError, OSError) as e:
            failed.append(e)
            click.echo(f"\nnote: no more previews: {one_line(str(e))}", err=True)

    t0 = time.perf_counter()
    label = "sampling" if runs == 1 else f"sampling ({runs} runs of {steps_run} steps)"  # the total is theirs
    with progress(runs * steps_run, label, unit="steps") as bar:
        for index, image in iter_samples(model, plan, callback=lambda i, t: bar.update(1),
                                         on_x0=show if preview is not None else None):
            save_png(out_dir / f"seed{seed}_{index:05d}.png", image, png_text(model, request, index))
            written.append(index)
            if grid is not None:
                paste_into_grid(grid, index, image)
            if live is not None:
                paste_into_grid(live, index, image)
    elapsed = time.perf_counter() - t0
    if grid is not None:
        save_png(grid_image, grid, png_text(model, request, -1))
    click.echo(f"wrote {num_images} image(s) to {out_dir}" + (f" and {grid_image}" if grid_image else "")
               + f"; {elapsed / num_images:.3g} s/image, peak RSS {format_size(peak_rss())}", err=True)


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
