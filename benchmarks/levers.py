"""The coherence levers side by side: the last evaluation row of each training run (seam score of its preview
samples beside real images', and the GCC-use probe per noise band), from each run's eval_log.csv.

    python benchmarks/levers.py runs/levers/*
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import click

from benchlib import RESULTS, write_results


def describe(run: Path) -> dict:
    """The run's lever settings, from the config its checkpoint's sidecar (config.json) or name holds."""
    path = run / "config.json"
    return json.loads(path.read_text()) if path.exists() else {}


@click.command(epilog="Example: python benchmarks/levers.py runs/levers/*")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS / "levers", show_default=True)
def main(runs, out):
    """One row per run: its last evaluation; and the runs' last previews side by side (OUT_previews.png)."""
    rows, previews = [], []
    for run in runs:
        evals = list(csv.DictReader(open(run / "eval_log.csv"))) if (run / "eval_log.csv").exists() else []
        if not evals:
            click.echo(f"{run}: no evaluation yet", err=True)
            continue
        last = evals[-1]
        cfg = describe(run)
        preview = run / f"preview_{int(last['step']):07d}.png"
        if preview.exists():
            previews.append(preview)
        rows.append({"run": run.name, "prediction": cfg.get("prediction", ""),
                     "position": "yes" if cfg.get("use_position", True) else "no",
                     "gcc_source": cfg.get("gcc_source", "") if cfg.get("use_gcc", True) else "no GCC",
                     "global_context": cfg.get("global_context", ""), "weighting": cfg.get("loss_weighting", ""),
                     **{k: (float(v) if k != "step" else int(v)) for k, v in last.items() if v != ""}})
        click.echo(f"{run.name}: step {last['step']}, seam {last['seam']} (real {last['seam_real']}), "
                   f"GCC swap +{float(last.get('swap_increase_700_1000') or 0):.1%} at t >= 700")
    write_results(out, "Coherence levers: last evaluation of each run",
                  [("run", "run"), ("prediction", "prediction"), ("position", "position"), ("gcc_source", "GCC from"),
                   ("global_context", "global vector cells"), ("weighting", "loss weighting"), ("step", "step"),
                   ("seam", "seam (samples)"), ("seam_real", "seam (real)"),
                   ("swap_increase_0_300", "GCC swap, t<300"), ("swap_increase_300_700", "t 300-700"),
                   ("swap_increase_700_1000", "t>=700"), ("mse_true_gcc_700_1000", "x0 MSE t>=700")], rows,
                  "GCC swap: relative increase of the x0_hat error when each image gets another image's GCC; "
                  "a model that ignores GCC scores 0. Seam from the run's preview samples (16, DDIM 50). "
                  "Previews, left to right in the table's order: " + out.name + "_previews.png")
    if previews:
        from PIL import Image

        images = [Image.open(p).convert("RGB") for p in previews]
        strip = Image.new("RGB", (sum(i.width for i in images) + 8 * (len(images) - 1), max(i.height for i in images)),
                          "white")
        x = 0
        for image in images:
            strip.paste(image, (x, 0))
            x += image.width + 8
        strip.save(out.with_name(out.name + "_previews.png"))


if __name__ == "__main__":
    main()
