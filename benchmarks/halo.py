"""The halo study: runs trained by benchmarks/train_halo.sh, exported and measured side by side.

Per run: seam score next to the real images' (and their ratio), the border step, KID (x1000, against all real
images of the set, or its held-out split with --real heldout) and its ratio to the 1x1 baseline of the same
group, s/image and peak RSS of `patchgen-sample` (fresh processes, via quality.py), and the training compute
time from the run's own log. A side-by-side PNG shows 8 samples per run (same seeds), with the real images
last in each group.

    python benchmarks/halo.py --runs runs/halo                      # every group folder in runs/halo
    python benchmarks/halo.py --runs runs/halo --groups g1 --num-samples 200 --out /tmp/halo
    python benchmarks/halo.py --runs runs/halo --num-samples 4 --sampler ddim:2 --repeats 1 --real heldout  # smoke
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import click

from benchlib import RESULTS, python, run_fresh, write_results
from quality import REPO, check, measure, sampler_plan


def export(run: Path) -> Path:
    """run/model.onnx from run/checkpoint.pt (the EMA weights), re-exported when the checkpoint is newer."""
    ckpt, onnx_path = run / "checkpoint.pt", run / "model.onnx"
    if not onnx_path.exists() or onnx_path.stat().st_mtime < ckpt.stat().st_mtime:
        check(run_fresh(python("-m", "patchgen.cli.export", str(ckpt), "-o", str(onnx_path), "--force")))
    return onnx_path


def training(run: Path) -> dict:
    """What the run is (from config.json) and what it cost: steps and compute seconds (sum over the logged steps
    of batch / images_per_s, previews and checkpoints excluded)."""
    cfg = json.loads((run / "config.json").read_text())
    rows = list(csv.DictReader(open(run / "train_log.csv")))
    seconds = sum(cfg["batch_size"] / float(r["images_per_s"]) for r in rows)
    return {"run": run.name, "image_size": cfg["image_size"], "grid_n": cfg["grid"], "halo_px": cfg.get("halo", 0),
            "edge_mask": "yes" if cfg.get("edge_mask") else "no", "batch": cfg["batch_size"],
            "steps": int(rows[-1]["step"]) if rows else 0, "train_s": seconds}


def order(run: Path) -> tuple:
    info = json.loads((run / "config.json").read_text())
    return (info["grid"] > 1, info.get("halo", 0), bool(info.get("edge_mask")))


def labelled_panel(rows: list[tuple[str, "object"]], scale: int):
    """One picture: per row a label and 8 samples side by side, upscaled `scale` times (nearest)."""
    import numpy as np
    from PIL import Image, ImageDraw

    from patchgen.runtime.images import make_grid

    grids = [make_grid(images, ncols=8) for _, images in rows]
    grids = [g.repeat(scale, axis=0).repeat(scale, axis=1) for g in grids]
    label_w, width = 130, max(g.shape[1] for g in grids)
    panel = Image.new("RGB", (label_w + width, sum(g.shape[0] for g in grids)), "white")
    draw, y = ImageDraw.Draw(panel), 0
    for (label, _), g in zip(rows, grids):
        panel.paste(Image.fromarray(np.ascontiguousarray(g)), (label_w, y))
        draw.text((4, y + g.shape[0] // 2 - 6), label, fill="black")
        y += g.shape[0]
    return panel


@click.command(epilog="Example: python benchmarks/halo.py --runs runs/halo --num-samples 1000")
@click.option("--runs", "runs_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The OUT of train_halo.sh: one folder per group, one per run inside.")
@click.option("--groups", default=None, help="Comma-separated group folders to measure [default: all].")
@click.option("--num-samples", type=click.IntRange(min=2), default=1000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=REPO / "runs" / "quality_cache",
              show_default=True, help="Where samples and features are kept between runs.")
@click.option("--sampler", default="dpm++:20", show_default=True,
              help="sampler:steps of the samples and of the timed runs.")
@click.option("--real", "real_set", type=click.Choice(["heldout", "all"]), default="all", show_default=True,
              help="Real images to compare with: the whole set, or its held-out split (fewer: a smoke run).")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Rounds of the peak RSS and s/image runs (fresh processes; the runs take turns in each).")
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS / "halo", show_default=True)
def main(runs_dir, groups, num_samples, seed, cache, sampler, real_set, repeats, out):
    """Measure every finished run of the halo study; write OUT.{md,json} and OUT_samples.png."""
    ((sampler, steps),) = sampler_plan(sampler)  # one sampler
    cache.mkdir(parents=True, exist_ok=True)
    chosen = groups.split(",") if groups else None
    studied = {}
    for group in sorted(p for p in runs_dir.iterdir() if p.is_dir() and (chosen is None or p.name in chosen)):
        runs = sorted((r for r in group.iterdir() if (r / "checkpoint.pt").exists()), key=order)
        if runs:
            studied[group.name] = [(training(r), export(r)) for r in runs]
    if not studied:
        raise click.ClickException(f"no finished runs (with checkpoint.pt) under {runs_dir}")
    # One measure() call for all runs: every fresh process runs before this driver imports numpy.
    rows, shown = measure([m for runs in studied.values() for _, m in runs], [(sampler, steps)], num_samples, seed,
                          50, cache, real_set, repeats)
    table, panels, k = [], [], 0
    for name, runs in studied.items():
        group_rows, group_shown = rows[k:k + len(runs)], shown[k:k + len(runs)]
        k += len(runs)
        info = [i for i, _ in runs]
        baseline = next((row["kid_x1000"] for row, i in zip(group_rows, info) if i["grid_n"] == 1), None)
        for row, i in zip(group_rows, info):
            row.update(i, group=name, seam_ratio=row["seam"] / row["seam_real"],
                       kid_vs_full=row["kid_x1000"] / baseline if baseline else None,
                       setting=f"{i['image_size']}px, {i['grid_n']}x{i['grid_n']}")
            table.append(row)
        labels = [f"{i['grid_n']}x{i['grid_n']}, halo {i['halo_px']}" + (" + mask" if i["edge_mask"] == "yes" else "")
                  for i in info]
        panels.append(labelled_panel([*zip(labels, (images for _, images, _ in group_shown)),
                                      ("real", group_shown[0][2])], max(1, 64 // info[0]["image_size"])))
    write_results(out, f"Halo study: neighbour context per patch, Twemoji faces ({num_samples} samples each, "
                  f"{sampler} {steps} steps)",
                  [("setting", "setting"), ("run", "run"), ("halo_px", "halo (px)"), ("edge_mask", "edge mask"),
                   ("steps", "steps"), ("batch", "batch"), ("seam", "seam"), ("seam_real", "seam, real"),
                   ("seam_ratio", "seam / real"), ("border", "border step"), ("border_real", "border step, real"),
                   ("kid_x1000", "KID x1000"), ("kid_vs_full", "KID / 1x1"), ("s_per_image", "s/image"),
                   ("peak_mib", "peak RSS (MiB)"), ("train_s", "training (s)")], table,
                  "Same recipe and width in each group (x0-prediction, global vector 4, lr 5e-4, bf16, base width 32, "
                  "1-2-2), one torch thread per run, two runs side by side. KID against "
                  + ("all real images of the set " if real_set == "all" else "the set's held-out images ")
                  + "(EfficientNet-Lite0 features); seam and border step at the model's grid (a 1x1 at the largest "
                  "grid of its image size). s/image and peak RSS: `patchgen-sample`, 4 images, the default budget's "
                  f"plan, 2 threads, {repeats} fresh processes (the fastest time, the largest peak). Training: "
                  "compute seconds from the run's log. "
                  f"Samples: {out.name}_samples.png.")
    from PIL import Image

    width = max(p.width for p in panels)
    picture = Image.new("RGB", (width, sum(p.height for p in panels) + 12 * (len(panels) - 1)), "white")
    y = 0
    for p in panels:
        picture.paste(p, (0, y))
        y += p.height + 12
    picture.save(out.with_name(out.name + "_samples.png"))


if __name__ == "__main__":
    main()
