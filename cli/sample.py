"""`patchgen-sample`: generate images from a patchgen ONNX model, patch by patch, under a memory budget.

Edge path: imports only numpy, onnxruntime, pillow and click (never torch).
"""
from __future__ import annotations

import os
import time
from importlib import resources
from pathlib import Path

import click

from patchgen.runtime.loop import DEFAULT_STEPS, SAMPLERS

from .common import CliError, Command, user_errors

PRETRAINED_DIR = Path(str(resources.files("patchgen.models").joinpath("pretrained")))  # shipped as package data
DEFAULT_MODEL = "faces64_2x2.onnx"  # in PRETRAINED_DIR
EXAMPLE = """
\b
Examples:
  patchgen-sample --num-images 16 --grid-image samples.png       # the shipped smileys model
  patchgen-sample --model emoji64_2x2 --sampler dpm++            # a shipped model by name
  patchgen-sample --model emoji32.onnx --sampler dpm++ --steps 20 --seed 7 --out samples/
  patchgen-sample --model emoji32.onnx --memory-budget 150M      # largest patch batch that fits
"""


def shipped_models() -> list[str]:
    return sorted(p.stem for p in PRETRAINED_DIR.glob("*.onnx"))


def resolve_model(model: str | None) -> Path:
    """--model: an .onnx file, or the name of a shipped model (`faces64_2x2`); none given: the default."""
    if model is None:
        path = PRETRAINED_DIR / DEFAULT_MODEL
        if not path.is_file():
            raise CliError(f"no shipped default model ({DEFAULT_MODEL}) in this install; pass --model FILE.onnx "
                           f"(make one with patchgen-train and patchgen-export)")
        return path
    if Path(model).exists():
        return Path(model)  # load_model names anything wrong with it
    shipped = PRETRAINED_DIR / f"{model.removesuffix('.onnx')}.onnx"
    if os.sep not in model and shipped.is_file():
        return shipped
    raise CliError(f"model {model} does not exist; pass an .onnx file written by patchgen-export or a shipped "
                   f"model: {', '.join(shipped_models()) or 'none in this install'}")


@click.command(cls=Command, epilog=EXAMPLE, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--model", "model_path", default=None,
              help=f"An .onnx file from patchgen-export, or a shipped model: {', '.join(shipped_models()) or 'none'}. "
                   f"[default: {DEFAULT_MODEL.removesuffix('.onnx')}]")
@click.option("-n", "--num-images", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Image i depends only on (seed, i).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Sampler steps [default: ddpm 1000, ddim 50, dpm++ 20].")
@click.option("--sampler", type=click.Choice(SAMPLERS), default="ddim", show_default=True)
@click.option("--eta", type=click.FloatRange(0, 1), default=0.0, show_default=True, help="DDIM noise (0 = deterministic).")
@click.option("--patch-batch", type=click.IntRange(min=1), default=None, help="Patches per onnxruntime call [default: 1, the lowest memory].")
@click.option("--memory-budget", default=None, help="Peak RSS limit such as 200M or 1.5G; picks the largest patch batch that fits.")
@click.option("--threads", type=click.IntRange(min=1), default=min(os.cpu_count() or 1, 4), show_default=True, help="onnxruntime intra-op threads.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("samples"), show_default=True, help="Folder for the PNGs.")
@click.option("--grid-image", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also write all images as one grid PNG.")
@user_errors
def main(model_path, num_images, seed, steps, sampler, eta, patch_batch, memory_budget, threads, out_dir, grid_image):
    """Generate images with a patch-based diffusion model: the U-Net denoises one patch per call,
    so peak memory follows the patch batch, not the image size."""
    import numpy as np

    from patchgen.runtime.files import check_writable_folder
    from patchgen.runtime.generate import check_request, iter_samples, make_plan, png_text
    from patchgen.runtime.images import make_grid, save_png
    from patchgen.runtime.memory import format_size, peak_rss
    from patchgen.runtime.model import load_model

    steps = steps or DEFAULT_STEPS[sampler]
    model = load_model(resolve_model(model_path), threads)
    check_request(model, num_images, steps, sampler)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CliError(f"cannot create output folder {out_dir}: {e.strerror}") from None
    check_writable_folder(out_dir)
    if grid_image is not None:
        check_writable_folder(grid_image.parent)
    plan = make_plan(model, num_images, memory_budget, patch_batch)
    spec = model.spec
    click.echo(f"{model.path.name}: {spec.image_size}x{spec.image_size}, {spec.grid}x{spec.grid} patches of "
               f"{spec.patch_size}px; {plan.patch_batch} patch(es) per call, {plan.images_per_run} image(s) per run"
               + (f", predicted peak {format_size(plan.predicted_peak)}" if plan.predicted_peak else ""), err=True)
    if model.metadata.get("patchgen.data.attribution"):
        click.echo(f"model trained on: {model.metadata['patchgen.data.attribution']}", err=True)

    runs = -(-num_images // plan.images_per_run)
    images = []
    t0 = time.perf_counter()
    with click.progressbar(length=runs * steps, label="sampling", file=click.get_text_stream("stderr")) as bar:
        for index, image in iter_samples(model, plan, num_images=num_images, seed=seed, steps=steps,
                                         sampler=sampler, eta=eta, callback=lambda i, t: bar.update(1)):
            save_png(out_dir / f"seed{seed}_{index:05d}.png", image, png_text(model, seed, index, sampler, steps, eta))
            if grid_image is not None:
                images.append(image)
    elapsed = time.perf_counter() - t0
    if grid_image is not None:
        save_png(grid_image, make_grid(np.stack(images)), png_text(model, seed, -1, sampler, steps, eta))
    click.echo(f"wrote {num_images} image(s) to {out_dir}" + (f" and {grid_image}" if grid_image else "")
               + f"; {elapsed / num_images:.2f} s/image, peak RSS {format_size(peak_rss())}", err=True)


if __name__ == "__main__":
    main()
