"""Memory budget sweep: `patchgen-sample --memory-budget B` from the minimum it recommends to all patches at once.

Per model: a 1 MiB budget, refused with the minimum, several times (how much that minimum moves between
processes); then the smallest minimum reported, +2 MiB, +8 MiB and budgets up to 10 % above the peak of
all patches at once, each run `--repeats` times. Every run is a fresh process whose peak RSS is the
kernel's (ru_maxrss, seen from this lean driver); a budget is met when every repeat stays within it.

    python benchmarks/budget_sweep.py                                  # random-weight edge model, 256x256, 4x4
    python benchmarks/budget_sweep.py --model faces64_2x2 --random 32/4/64 --random 128/1/8 --repeats 5
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import click

from benchlib import RESULTS, plot, random_model, refused_minimum, sample_cli, write_results



def sample(model: str, out: Path, num_images: int, steps: int, threads: int, *extra: str) -> dict:
    return sample_cli(model, out, *extra, num_images=num_images, steps=steps, threads=threads)


def sweep(model: str, tmp: Path, num_images: int, steps: int, threads: int, points: int, repeats: int) -> list[dict]:
    name = Path(model).name
    found = [refused_minimum(model, tmp / "refused", num_images=num_images, steps=steps, threads=threads)
             for _ in range(repeats)]
    refused = [r for _, runs in found for r in runs]
    if any(r["returncode"] != 2 or r["created_out"] for r in refused) or any(m is None for m, _ in found):
        raise click.ClickException(f"expected 1M to be refused with the minimum and no output: {refused[0]['stderr']}")
    minima = [m for m, _ in found]
    rows = [{"model": name, "budget_mib": 1.0, "runs": repeats, "patch_batch": "-",
             "peak_mib": max(r["peak_mib"] for r in refused),
             "within": f"refused, exit 2, no output; minimum {min(minima):.1f} .. {max(minima):.1f} MiB"}]
    all_at_once = sample(model, tmp / "all", num_images, steps, threads, "--patch-batch", "1000000")
    g2 = all_at_once["report"]["model"]["grid"] ** 2
    low, top = min(minima), all_at_once["peak_mib"] * 1.1
    budgets = [low, low + 2, low + 8][:points]
    more = points - len(budgets)
    if more > 0 and top > low + 8:  # the rest evenly up to 10 % above the peak of all patches at once
        budgets += [low + 8 + (top - low - 8) * k / more for k in range(1, more + 1)]
    for budget in budgets:
        runs = [sample(model, tmp / "s", num_images, steps, threads, "--memory-budget", f"{budget:.1f}M")
                for _ in range(repeats)]
        peaks = [r["peak_mib"] for r in runs]
        ok = all(r["returncode"] == 0 and r["peak_mib"] <= budget for r in runs)
        failed = next((r for r in runs if r["returncode"] != 0), None)
        row = {"model": name, "budget_mib": round(budget, 1), "runs": repeats,
               "patch_batch": "/".join(sorted({str(r["patch_batch"]) for r in runs}, key=int)),
               "allocation": "/".join(sorted({str(r["allocation"]) for r in runs})),
               "predicted_mib": max(r["predicted_mib"] or 0 for r in runs), "peak_mib": max(peaks),
               "spread_mib": max(peaks) - min(peaks), "headroom_mib": budget - max(peaks),
               "s_per_image": min(r["s_per_image"] or float("inf") for r in runs),
               "within": "yes" if ok else "NO" + (f" (exit {failed['returncode']}: {failed['stderr'].strip()[-90:]})"
                                                  if failed else "")}
        click.echo(f"{name} budget {budget:.1f} MiB: batch {row['patch_batch']} {row['allocation']}, predicted {row['predicted_mib']:.1f}, "
                   f"peak {min(peaks):.1f} .. {max(peaks):.1f} MiB, within: {row['within']}")
        rows.append(row)
    rows.append({"model": name, "budget_mib": f"none (--patch-batch {num_images * g2})", "runs": 1,
                 "patch_batch": num_images * g2, "peak_mib": all_at_once["peak_mib"],
                 "s_per_image": all_at_once["s_per_image"], "within": "-"})
    return rows


@click.command(epilog="Example: python benchmarks/budget_sweep.py --model faces64_2x2 --random 128/1/8 --repeats 5")
@click.option("--model", "models", multiple=True, help="An exported model or a shipped model's name (repeatable).")
@click.option("--random", "randoms", multiple=True,
              help="A random-weight model made here (needs torch), as SIZE/GRID/BASE_WIDTH (repeatable).")
@click.option("--image-size", type=int, default=256, show_default=True, help="The random model when none is given.")
@click.option("--grid", type=int, default=4, show_default=True)
@click.option("--base-width", type=int, default=32, show_default=True)
@click.option("-n", "--num-images", type=int, default=2, show_default=True)
@click.option("--steps", type=int, default=2, show_default=True)
@click.option("--points", type=click.IntRange(min=2), default=6, show_default=True, help="Budgets per model.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="Fresh runs per budget.")
@click.option("--threads", type=int, default=1, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS / "budget_sweep", show_default=True)
def main(models, randoms, image_size, grid, base_width, num_images, steps, points, repeats, threads, out):
    """Measured peak RSS against the memory budget, from the recommended minimum up."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not models and not randoms:
            randoms = [f"{image_size}/{grid}/{base_width}"]
        for spec in randoms:
            size, g, width = map(int, spec.split("/"))
            path = random_model(tmp / f"random_{size}_{g}x{g}_w{width}.onnx", size, g, base_width=width)
            models = (*models, str(path))
        for model in models:
            rows += sweep(model, tmp, num_images, steps, threads, points, repeats)
    write_results(out, f"Memory budget sweep: {num_images} images, {steps} DDIM steps, {threads} thread(s), "
                       f"{repeats} fresh runs per budget",
                  [("model", "model"), ("budget_mib", "budget (MiB)"), ("patch_batch", "patch batch"),
                   ("allocation", "allocation"), ("predicted_mib", "predicted (MiB)"), ("peak_mib", "peak RSS, max (MiB)"),
                   ("spread_mib", "peak spread (MiB)"), ("headroom_mib", "budget - peak (MiB)"),
                   ("within", "peak <= budget"), ("s_per_image", "s/image")], rows,
                  "Each run is a fresh `patchgen-sample` process; peak RSS is the kernel's ru_maxrss. The first row "
                  "of a model is a 1 MiB budget; the next is the smallest minimum those refusals reported. The planner "
                  "chooses the allocation (lean: memory-first; arena: onnxruntime's) and the patch batch by measured "
                  "speed within the budget; the threads are fixed. "
                  "random_SIZE_GxG_wW: random weights, base width W (benchlib.random_model).")
    swept = [r for r in rows if isinstance(r["budget_mib"], float) and r["budget_mib"] > 1]

    def draw(ax):
        for k, name in enumerate(dict.fromkeys(r["model"] for r in swept)):
            mine = [r for r in swept if r["model"] == name]
            ax.plot([r["budget_mib"] for r in mine], [r["peak_mib"] for r in mine], "-o", color=f"C{k}", label=name)
        lim = [min(r["budget_mib"] for r in swept), max(r["budget_mib"] for r in swept)]
        ax.plot(lim, lim, ":", color="gray", label="budget")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("--memory-budget (MiB)")
        ax.set_ylabel("peak RSS, max of the repeats (MiB)")
        ax.legend(loc="upper left", fontsize=8)
    plot(out, draw)


if __name__ == "__main__":
    main()
