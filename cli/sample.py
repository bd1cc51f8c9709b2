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
from patchgen.runtime.pretrained import DEFAULT_MODEL, shipped_models
from patchgen.runtime.session import DEFAULT_PROVIDER, available_providers

from .common import CliError, Command, user_errors

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
@user_errors
def main(model_path, num_images, seed, steps, sampler, eta, patch_batch, memory_budget, threads, provider, out_dir,
         grid_image):
    """Generate images with a patch-based diffusion model: the U-Net denoises one patch per call,
    so peak memory follows the patch batch, not the image size."""
    from patchgen.runtime.files import check_writable_folder, made_folder, remove_if_empty
    from patchgen.runtime.generate import make_plan
    from patchgen.runtime.images import grid_memory
    from patchgen.runtime.model import load_model

    # Everything is checked, and memory planned, before the first folder or file is created.
    check_output_folder(out_dir)
    if grid_image is not None:
        check_writable_folder(grid_image.parent)
    model = load_model(model_path, threads, provider, memory_budget)
    if grid_image is not None and _is_input(grid_image, model.path):
        raise CliError(f"--grid-image {grid_image} is the model file (or its weights); choose another path")
    if grid_image is not None and _is_sample(grid_image, out_dir, seed, num_images):
        raise CliError(f"--grid-image {grid_image} is one of this run's own PNGs, which would overwrite it or it "
                       "them; choose another name")
    c, h, w = model.spec.image_shape
    plan = make_plan(model, num_images, seed, sampler, steps, eta, memory_budget=memory_budget,
                     patch_batch=patch_batch, held_bytes=grid_memory(num_images, h, w, c) if grid_image else 0)
    for note in model.notes + plan.notes:
        click.echo(f"note: {note}", err=True)
    out_dir, made = made_folder(out_dir)
    try:
        check_writable_folder(out_dir)
        _sample(model, plan, seed, num_images, out_dir, grid_image)
    except BaseException:
        remove_if_empty(made)  # a run that wrote no image leaves no folder behind
        raise


def _is_input(path: Path, model_path: Path) -> bool:
    """Whether writing `path` would replace the model file or one of its external-data files."""
    from patchgen.runtime.onnxfile import external_data_files

    try:
        inputs = [model_path, *(model_path.parent / name for name in external_data_files(model_path))]
    except (OSError, ValueError):
        inputs = [model_path]
    return path.exists() and any(p.exists() and path.samefile(p) for p in inputs)


def _is_sample(path: Path, out_dir: Path, seed: int, num_images: int) -> bool:
    """Whether `path` is where this run writes one of its images (seed<S>_<index>.png in out_dir)."""
    if os.path.realpath(path.parent) != os.path.realpath(out_dir):
        return False
    index = path.name.removeprefix(f"seed{seed}_").removesuffix(".png")
    return path.name == f"seed{seed}_{index}.png" and index.isdigit() and len(index) == 5 and int(index) < num_images


def _sample(model, plan, seed, num_images, out_dir, grid_image):
    """Sample the plan's images into out_dir (and the grid), with a progress bar and a closing report."""
    from patchgen.runtime.files import remove_stale_temporaries
    from patchgen.runtime.generate import iter_samples, png_text
    from patchgen.runtime.images import new_grid, paste_into_grid, save_png
    from patchgen.runtime.memory import format_size, peak_rss

    remove_stale_temporaries(out_dir, "seed*_*.png")  # left by a killed run
    if grid_image is not None:
        remove_stale_temporaries(grid_image.parent, grid_image.name)

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
    if model.metadata.get("patchgen.data.attribution"):
        click.echo(f"model trained on: {model.metadata['patchgen.data.attribution']}", err=True)

    c, h, w = spec.image_shape
    runs = -(-num_images // plan.images_per_run)
    grid = new_grid(num_images, h, w, c) if grid_image is not None else None  # filled as images arrive
    t0 = time.perf_counter()
    with click.progressbar(length=runs * request.steps, label="sampling", file=sys.stderr) as bar:
        for index, image in iter_samples(model, plan, callback=lambda i, t: bar.update(1)):
            save_png(out_dir / f"seed{seed}_{index:05d}.png", image, png_text(model, request, index))
            if grid is not None:
                paste_into_grid(grid, index, image)
    elapsed = time.perf_counter() - t0
    if grid is not None:
        save_png(grid_image, grid, png_text(model, request, -1))
    click.echo(f"wrote {num_images} image(s) to {out_dir}" + (f" and {grid_image}" if grid_image else "")
               + f"; {elapsed / num_images:.2f} s/image, peak RSS {format_size(peak_rss())}", err=True)


if __name__ == "__main__":
    main()
