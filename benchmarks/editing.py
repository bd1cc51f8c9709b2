"""What editing costs: s/image of inpainting against the share of patches painted, next to plain sampling.

Per model: an input (the model's own sample, seed 7) and masks that paint 1, 2, 4, ... whole patches (row-major
from the top left) up to all of them, and one patch with --repaint-jumps (DDIM); every setting is a fresh `patchgen-sample` process with the same
sampler, steps and memory budget, interleaved round by round (plain, 1, 2, ... patches, plain ...), so the
shared machine's swings hit every setting alike. Reported: the sampling s/image (the run's own figure, after
planning; the median), its ratio to plain sampling in the same round (median, range), the patch batch
chosen and the kernel's peak RSS (the largest over rounds) against the budget. Then a figure per model:
input, mask, inpainted, and img2img at strength 0.3, 0.6 and 0.9.

    python benchmarks/editing.py --rounds 3
    python benchmarks/editing.py --models faces64_2x2 --rounds 1 --steps 2 --out /tmp/editing
"""
from __future__ import annotations

import math
import statistics
import tempfile
from pathlib import Path

import click

from benchlib import RESULTS, python, run_fresh, sample_cli, write_results
from patchgen.runtime.memory import MIB, parse_size  # plain Python: the driver stays lean

INPUTS_CHILD = r"""
import sys, numpy as np
from patchgen.runtime.generate import generate
from patchgen.runtime.images import save_png
from patchgen.runtime.model import load_model
model_name, folder = sys.argv[1], sys.argv[2]
model = load_model(model_name)
image = generate(model, 1, seed=7, sampler="dpm++", steps=20, memory_budget="min")[0]
save_png(f"{folder}/input.png", image)
g, p = model.spec.grid, model.spec.patch_size
counts = [2**e for e in range(2 * (g - 1).bit_length()) if 2**e < g * g] + [g * g]  # 1, 2, 4, ... all
print(",".join(map(str, counts)))
for k in counts:  # the first k patches, row-major, white
    mask = np.zeros((g * p, g * p, 1), np.uint8)
    for index in range(k):
        r, c = divmod(index, g)
        mask[r * p:(r + 1) * p, c * p:(c + 1) * p] = 255
    save_png(f"{folder}/mask{k}.png", mask)
"""

FIGURE_CHILD = r"""
import sys, numpy as np
from patchgen.runtime.generate import generate
from patchgen.runtime.images import make_grid, save_png
from patchgen.runtime.model import load_model
out, steps, rows = sys.argv[1], int(sys.argv[2]), []
for name in sys.argv[3:]:
    model = load_model(name)
    size, g, p = model.spec.image_size, model.spec.grid, model.spec.patch_size
    image = generate(model, 1, seed=7, sampler="dpm++", steps=20, memory_budget="min")[0]
    paint = np.zeros((size, size), bool)
    if g == 2:  # the bottom-left patch
        paint[p:, :p] = True
    else:  # the centre 2x2 patches
        c = g // 2
        paint[(c - 1) * p:(c + 1) * p, (c - 1) * p:(c + 1) * p] = True
    mask = image.copy()
    mask[paint] = 128  # the input with the painted area grey
    inpainted = generate(model, 1, seed=1, sampler="dpm++", steps=steps, memory_budget="min", init_image=image,
                         mask=paint)[0]
    varied = [generate(model, 1, seed=1, sampler="dpm++", steps=steps, memory_budget="min", init_image=image,
                       strength=s)[0] for s in (0.3, 0.6, 0.9)]
    cells = [np.asarray(np.kron(c, np.ones((128 // size, 128 // size, 1), np.uint8)) if size < 128 else c)
             for c in [image, mask, inpainted, *varied]]
    rows.append(make_grid(np.stack(cells), ncols=6))
save_png(out, np.concatenate(rows, axis=0), {"columns": "input, mask (grey: painted), inpainted, "
                                                        "img2img strength 0.3, 0.6, 0.9 (dpm++)"})
"""


@click.command(epilog="Example: python benchmarks/editing.py --models faces64_2x2 --rounds 1 --steps 2 --out /tmp/e")
@click.option("--models", default="faces64_2x2,noto128_4x4", show_default=True, help="Shipped names or .onnx paths.")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--sampler", default="dpm++", show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--num-images", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--memory-budget", default="300M", show_default=True, help="The one budget every setting runs under.")
@click.option("--jumps", type=click.IntRange(min=0), default=4, show_default=True,
              help="Also time one painted patch with this many RePaint jumps per step (0: not).")
@click.option("--figure/--no-figure", default=True, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS / "editing", show_default=True)
def main(models, rounds, sampler, steps, num_images, memory_budget, jumps, figure, out):
    """s/image of inpainting against the patches painted, next to plain sampling, and a figure of the edits."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plan: dict[str, dict[str, list[str]]] = {}
        for name in models.split(","):
            folder = tmp / Path(name).stem
            folder.mkdir()
            made = run_fresh(python("-c", INPUTS_CHILD, name, str(folder)))
            if made["returncode"]:
                raise click.ClickException(made["stderr"])
            counts = [int(k) for k in made["stdout"].split(",")]  # painted patches: 1, 2, 4, ... all
            grid = math.isqrt(counts[-1])
            settings = {"plain sampling": []}
            for k in counts:
                settings[f"inpaint {k}/{grid * grid}"] = ["--init-img", str(folder / "input.png"),
                                                          "--mask", str(folder / f"mask{k}.png")]
            if jumps:  # RePaint's resampling needs ddim or ddpm: ddim, whose step costs dpm++'s one call
                settings[f"inpaint 1/{grid * grid}, {jumps} RePaint jumps (ddim)"] = [
                    "--init-img", str(folder / "input.png"), "--mask", str(folder / "mask1.png"),
                    "--repaint-jumps", str(jumps), "--sampler", "ddim"]
            plan[name] = settings
        runs = {(name, s): [] for name, settings in plan.items() for s in settings}
        for r in range(rounds):
            for name, settings in plan.items():
                for setting, extra in settings.items():
                    chosen = [] if "--sampler" in extra else ["--sampler", sampler]
                    res = sample_cli(name, tmp / "out", *chosen, "--memory-budget", memory_budget, *extra,
                                     num_images=num_images, steps=steps, threads=None)
                    if res["returncode"]:
                        raise click.ClickException(f"{name} {setting}: {res['stderr']}")
                    runs[(name, setting)].append(res)
                    print(f"round {r + 1} {name} {setting}: {res['s_per_image']} s/image, {res['peak_mib']:.1f} MiB",
                          flush=True)
        for name, settings in plan.items():
            plain = runs[(name, "plain sampling")]
            for setting in settings:
                rs = runs[(name, setting)]
                ratios = [x["s_per_image"] / p["s_per_image"] for x, p in zip(rs, plain)]
                rows.append({"model": Path(name).stem, "setting": setting,
                             "patch_batch": "/".join(sorted({str(x["patch_batch"]) for x in rs}, key=int)),
                             "s_per_image": statistics.median(x["s_per_image"] for x in rs),
                             "vs_plain": statistics.median(ratios),
                             "range": f"{min(ratios):.3f}-{max(ratios):.3f}",
                             "peak_mib": max(x["peak_mib"] for x in rs),
                             "within": all(x["peak_mib"] * MIB <= parse_size(memory_budget) for x in rs)})
    write_results(out, f"What editing costs: s/image against the patches painted ({sampler} {steps} steps, "
                       f"{num_images} images, --memory-budget {memory_budget})",
                  [("model", "model"), ("setting", "setting"), ("patch_batch", "patches/call"),
                   ("s_per_image", "s/image"), ("vs_plain", "time / plain sampling's"), ("range", "range"),
                   ("peak_mib", "peak RSS (MiB)"), ("within", "peak <= budget")], rows,
                  f"Each cell is a fresh `patchgen-sample` process (threads: the planner's); {rounds} rounds, every "
                  "setting once per round (interleaved). s/image: the run's own sampling time per image, the median; "
                  "time / plain: the ratio to plain sampling (no --init-img) in the same round, median and range. "
                  "Inpaint k/N: --init-img (the model's own sample, seed 7) and a mask painting its first k of N "
                  "patches, row-major; the other patches make no network call. RePaint jumps: each step taken jumps + 1 "
                  "times (ddim, the same steps). Peak RSS: the kernel's (ru_maxrss), "
                  "the largest over rounds.")
    if figure:
        made = run_fresh(python("-c", FIGURE_CHILD, str(out.with_name(out.name + "_samples.png")), str(steps),
                                *models.split(",")))
        if made["returncode"]:
            raise click.ClickException(made["stderr"])


if __name__ == "__main__":
    main()
