"""The default recipe against the paper's, at equal budget, on two kinds of data: patchgen-train with --recipe
patchgen (x0-prediction, a global context vector, a halo of about P/4, lr 5e-4) and --recipe paper (eps, GCC
and position only, lr 2e-4), everything else the same (image size, grid, U-Net, batch, steps, seed).

Data: a built-in set (Twemoji's 125 faces) and a generated folder of 40 coloured circles, squares and
triangles on pale backgrounds, the kind of small set a new user brings. Each run trains in its own process
(two side by side, one torch thread each) and resumes from its checkpoint when the script runs again, so the
budget can be spread over sessions. Then, per run: the exported model's KID (x1000, against all real images
of its set) and local and global seam scores on --num-samples samples (--sampler: DPM++ 20, via quality.py),
and the run's own preview numbers over its steps (eval_log.csv: local seam, the 16-sample preview KID). A PNG shows 8
samples per run, the real images under each data set's pair; another, each run's previews over its steps.

    python benchmarks/recipe.py --shapes-steps 750               # 32x32, 2x2, 1500 (shapes: 750) steps x 16 images
    python benchmarks/recipe.py --steps 3000 --runs runs/recipe  # train on (resumes), then measure again
    python benchmarks/recipe.py --runs /tmp/r --image-size 16 --steps 2 --preview-every 2 --num-samples 4 \
        --base-width 8 --sampler ddim:2 --out /tmp/r/recipe     # a smoke run: a tiny model, seconds per run
"""
from __future__ import annotations

import csv
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click

from benchlib import RESULTS, write_results
from halo import export, labelled_panel
from quality import REPO, measure, sampler_plan

RECIPES = ("patchgen", "paper")
SHAPES = 40  # images in the generated folder


def make_shapes(folder: Path, n: int = SHAPES, size: int = 64, seed: int = 0) -> Path:
    """`folder` filled with n PNGs (size x size): one circle, square or triangle each, of a random saturated colour,
    size and place, on a random pale background. Made once; an existing folder is kept as it is."""
    import numpy as np
    from PIL import Image, ImageDraw

    if folder.is_dir() and len(list(folder.glob("*.png"))) == n:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        background = tuple(int(v) for v in rng.integers(215, 256, 3))
        colour = tuple(int(v) for v in rng.permutation([int(rng.integers(0, 60)), int(rng.integers(60, 200)), 230]))
        img = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(img)
        r = rng.uniform(0.18, 0.32) * size
        cx, cy = rng.uniform(r + 2, size - r - 2, 2)
        kind = i % 3
        if kind == 0:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        elif kind == 1:
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=colour)
        img.save(folder / f"shape_{i:03d}.png")
    return folder


def train(run: Path, data: str, recipe: str, image_size: int, grid: int, steps: int, preview_every: int,
          base_width: int | None = None) -> Path:
    """Train (or resume) one run to `steps` in a fresh process; its stderr goes to run.log beside it.
    base_width: None for patchgen-train's default."""
    args = ["--out", str(run), "--max-steps", str(steps), "--threads", "1", "--checkpoint-every", "250"]
    if not (run / "checkpoint.pt").exists():
        args += ["--data", data, "--recipe", recipe, "--image-size", str(image_size), "--grid", str(grid),
                 "--batch-size", "16", "--preview-every", str(preview_every), "--holdout", "0"]
        args += ["--base-width", str(base_width)] if base_width else []
    else:
        args += ["--resume"]
    with open(run.with_suffix(".log"), "a") as log:
        r = subprocess.run([sys.executable, "-m", "patchgen.cli.train", *args], stderr=log, stdout=log)
    if r.returncode:
        raise click.ClickException(f"training {run} failed ({r.returncode}); see {run.with_suffix('.log')}")
    return run


def preview_history(run: Path) -> list[dict]:
    """The run's eval_log.csv rows: step, local seam (samples, real), preview KID x1000, loss."""
    with open(run / "eval_log.csv", newline="") as f:
        return [{k: (float(row[k]) if row.get(k) else None) for k in ("step", "seam", "seam_real", "kid_x1000", "loss")}
                for row in csv.DictReader(f)]


def preview_sheet(runs: list[Path], path: Path) -> None:
    """One PNG: per run a row of its training previews (preview_NNNNNNN.png, 16 samples each), labelled with the
    run and each preview's step, so the steps a data set needs can be seen, not only read from a number."""
    from PIL import Image, ImageDraw

    rows = [(run.name, sorted(run.glob("preview_*.png"))) for run in runs]
    if not any(previews for _, previews in rows):
        return  # --preview-every beyond --steps: no preview to show
    cell = max(Image.open(p).size[0] for _, previews in rows for p in previews)
    label_w, head, gap = 150, 14, 6
    sheet = Image.new("RGB", (label_w + max(len(p) for _, p in rows) * (cell + gap), len(rows) * (cell + head + gap)),
                      "white")
    draw = ImageDraw.Draw(sheet)
    for r, (name, previews) in enumerate(rows):
        y = r * (cell + head + gap)
        draw.text((4, y + head + cell // 2 - 6), name, fill="black")
        for c, preview in enumerate(previews):
            x = label_w + c * (cell + gap)
            draw.text((x, y), f"step {int(preview.stem.split('_')[1])}", fill="black")
            sheet.paste(Image.open(preview).convert("RGB"), (x, y + head))
    sheet.quantize(256).save(path, optimize=True)  # a palette: the noisy quilts would weigh 0.6 MB as RGB


@click.command(epilog="Example: python benchmarks/recipe.py --steps 1500 --num-samples 200")
@click.option("--runs", type=click.Path(file_okay=False, path_type=Path), default=REPO / "runs" / "recipe",
              show_default=True, help="Where the runs (and the generated shapes) live; rerunning resumes them.")
@click.option("--image-size", type=int, default=32, show_default=True)
@click.option("--grid", type=int, default=2, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=1500, show_default=True,
              help="Training steps of 16 images, every run of the built-in set.")
@click.option("--shapes-steps", type=click.IntRange(min=1), default=None,
              help="Training steps of 16 images on the generated shapes (40 images); default: --steps.")
@click.option("--preview-every", type=click.IntRange(min=1), default=250, show_default=True)
@click.option("--num-samples", type=click.IntRange(min=2), default=200, show_default=True,
              help="Samples per model for KID and the seam scores.")
@click.option("--base-width", type=click.IntRange(min=8), default=None,
              help="U-Net channels at the first level of every run [default: patchgen-train's]; 8: a smoke run.")
@click.option("--sampler", default="dpm++:20", show_default=True, help="sampler:steps of the measured samples.")
@click.option("--parallel", type=click.IntRange(1, 4), default=2, show_default=True,
              help="Training processes at once (one torch thread each).")
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS / "recipe", show_default=True)
def main(runs, image_size, grid, steps, shapes_steps, preview_every, num_samples, base_width, sampler, parallel, out):
    """patchgen's default recipe against the paper's, at equal budget, on a built-in set and a generated folder."""
    shapes = make_shapes(runs / "shapes")
    datasets = {"emoji-faces": "emoji-faces", "shapes": str(shapes)}
    budget = {"emoji-faces": steps, "shapes": shapes_steps or steps}
    jobs = [(runs / f"{name}_{recipe}", data, recipe, budget[name]) for name, data in datasets.items()
            for recipe in RECIPES]
    for run, *_ in jobs:
        run.parent.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(lambda job: train(job[0], job[1], job[2], image_size, grid, job[3], preview_every, base_width),
                      jobs))
    models = [export(run) for run, *_ in jobs]
    (runs / "quality_cache").mkdir(exist_ok=True)
    ((sampler, sampler_steps),) = sampler_plan(sampler)  # one sampler
    rows, shown = measure(models, [(sampler, sampler_steps)], num_samples, seed=0, chunk=50,
                          cache=runs / "quality_cache", real_set="all", repeats=1, workers=2)
    for row, (run, _, recipe, _) in zip(rows, jobs):
        row.update(run=run.name, data=run.name.rsplit("_", 1)[0], recipe=recipe, history=preview_history(run))
    panel = []
    for i, (name, images, real) in enumerate(shown):
        panel.append((jobs[i][0].name, images))
        if jobs[i][2] == RECIPES[-1]:
            panel.append((f"{jobs[i][0].name.rsplit('_', 1)[0]}: real", real))
    import numpy as np

    from patchgen.runtime.images import save_png

    save_png(out.with_name(out.name + "_samples.png"), np.asarray(labelled_panel(panel, 3)),
             {"rows": ", ".join(label for label, _ in panel)})
    preview_sheet([run for run, *_ in jobs], out.with_name(out.name + "_previews.png"))
    history = [{"run": r["run"], **h} for r in rows for h in r["history"]]
    for r in rows:
        del r["history"]
    write_results(out, f"Recipes at equal budget per data set (steps x 16 images), {image_size}x{image_size}, "
                       f"{grid}x{grid} patches ({num_samples} samples each, {sampler} {sampler_steps})",
                  [("data", "data"), ("recipe", "recipe"), ("halo", "halo"), ("steps_trained", "steps"),
                   ("kid_x1000", "KID x1000"), ("seam_local", "local seam"), ("seam_local_real", "local seam, real"),
                   ("seam", "global seam"), ("seam_real", "global seam, real"), ("fd_effnet", "FD-EffNet"),
                   ("s_per_image", "s/image")], rows,
                  "KID against all real images of the set (EfficientNet-Lite0 features). Local seam: the step across "
                  "a patch border over the steps 1-3 px beside it (1 = no seam); global seam: over the steps "
                  "everywhere else. s/image: `patchgen-sample`, 4 images, 2 threads, the default budget.")
    write_results(out.with_name(out.name + "_history"), "Preview numbers over training (each run's eval_log.csv: "
                  "16 samples, DDIM 50)", [("run", "run"), ("step", "step"), ("seam", "local seam"),
                                           ("seam_real", "real"), ("kid_x1000", "preview KID x1000"),
                                           ("loss", "loss")], history)


if __name__ == "__main__":
    main()
