"""Memory budget sweep: `patchgen-sample --memory-budget B` from the model's minimum to all patches at once.

Each budget runs in a fresh process; its peak RSS is the kernel's (ru_maxrss). Reports the patch batch
the budget bought, the measured peak against the budget, and the time per image.

    python benchmarks/budget_sweep.py                       # random-weight edge model, 256x256, 4x4 grid
    python benchmarks/budget_sweep.py --model my.onnx --points 8
"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path

import click

from benchlib import RESULTS, plot, python, random_model, run_fresh, write_results

SAMPLE = ["-c", "from patchgen.cli.sample import main; main()"]


def sample(model: Path, out: Path, steps: int, threads: int, *extra: str) -> dict:
    r = run_fresh(python(*SAMPLE, "--model", str(model), "-n", "1", "--steps", str(steps), "--threads",
                         str(threads), "--out", str(out), *extra))
    m = re.search(r"(\d+) patch\(es\) per call", r["stderr"])
    t = re.search(r"([\d.]+) s/image", r["stderr"])
    r["patch_batch"] = int(m.group(1)) if m else None
    r["s_per_image"] = float(t.group(1)) if t else None
    return r


@click.command(epilog="Example: python benchmarks/budget_sweep.py --image-size 256 --grid 4 --points 6")
@click.option("--model", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="An exported model; default: a random-weight edge model made here (needs torch).")
@click.option("--image-size", type=int, default=256, show_default=True)
@click.option("--grid", type=int, default=4, show_default=True)
@click.option("--steps", type=int, default=20, show_default=True)
@click.option("--points", type=click.IntRange(min=2), default=6, show_default=True, help="Budgets in the sweep.")
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS / "budget_sweep", show_default=True)
def main(model, image_size, grid, steps, points, threads, out):
    """Measured peak RSS and time per image against the memory budget."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = model or random_model(tmp / f"edge_{image_size}_{grid}.onnx", image_size, grid)
        below = sample(model, tmp / "s", steps, threads, "--memory-budget", "1M")
        found = re.search(r"minimum of ([\d.]+)M", below["stderr"])
        if below["returncode"] != 2 or not found:
            raise click.ClickException(f"expected the 1M budget to fail with the minimum: {below['stderr']}")
        minimum = float(found.group(1))
        all_at_once = sample(model, tmp / "s", steps, threads, "--patch-batch", str(grid * grid))
        click.echo(f"minimum {minimum:.1f} MiB; all {grid * grid} patches at once peaks at {all_at_once['peak_mib']:.1f} MiB")
        top = all_at_once["peak_mib"] * 1.1
        rows = [{"budget_mib": 1.0, "returncode": below["returncode"], "patch_batch": "-", "peak_mib": below["peak_mib"],
                 "within": "refused: " + below["stderr"].strip().removeprefix("Error: ")[:90]}]
        for k in range(points):
            low = minimum * 1.02  # the minimum is itself measured and moves by about 1 % between processes
            budget = int(low + 1 + (top - low - 1) * k / (points - 1))
            r = sample(model, tmp / "s", steps, threads, "--memory-budget", f"{budget}M")
            row = {"budget_mib": float(budget), "returncode": r["returncode"], "patch_batch": r["patch_batch"],
                   "peak_mib": r["peak_mib"], "s_per_image": r["s_per_image"],
                   "within": "yes" if r["returncode"] == 0 and r["peak_mib"] <= budget
                   else f"NO (exit {r['returncode']}: {r['stderr'].strip()[-90:]})"}
            click.echo(f"budget {budget} MiB: batch {r['patch_batch']}, peak {r['peak_mib']:.1f} MiB, "
                       f"{r['s_per_image']} s/image, within: {row['within']}")
            rows.append(row)
        rows.append({"budget_mib": "none (--patch-batch all)", "returncode": all_at_once["returncode"],
                     "patch_batch": grid * grid, "peak_mib": all_at_once["peak_mib"],
                     "s_per_image": all_at_once["s_per_image"], "within": "-"})
    write_results(out, f"Memory budget sweep: {model.name}, {image_size}x{image_size}, {grid}x{grid} grid, "
                       f"{steps} DDIM steps (calibration included in s/image), {threads} threads",
                  [("budget_mib", "budget (MiB)"), ("patch_batch", "patch batch"), ("peak_mib", "peak RSS (MiB)"),
                   ("within", "peak <= budget"), ("s_per_image", "s/image")], rows,
                  "Each row is a fresh `patchgen-sample` process; peak RSS is the kernel's ru_maxrss.")
    swept = [r for r in rows[1:-1] if r["returncode"] == 0]

    def draw(ax):
        ax.plot([r["budget_mib"] for r in swept], [r["peak_mib"] for r in swept], "-o", label="measured peak")
        ax.plot([r["budget_mib"] for r in swept], [r["budget_mib"] for r in swept], ":", color="gray", label="budget")
        ax.set_xlabel("--memory-budget (MiB)")
        ax.set_ylabel("peak RSS (MiB)")
        twin = ax.twinx()
        twin.plot([r["budget_mib"] for r in swept], [r["s_per_image"] for r in swept], "-s", color="C1",
                  label="s/image")
        twin.set_ylabel("s/image", color="C1")
        ax.legend(loc="upper left", fontsize=8)
    plot(out, draw)


if __name__ == "__main__":
    main()
