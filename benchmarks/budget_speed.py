"""What a memory budget buys: s/image of `patchgen-sample` against --memory-budget, from the minimum to none.

Per model: the minimum budget it accepts (a 1 MiB budget refused, then the lower bound it names), then
every setting in fresh processes, interleaved round by round (min, the minimum, +8M, +32M, +128M, the
default budget, min ...), so that the shared machine's swings hit every setting alike. Reported per
setting: the planner's choice (allocation, patch batch), the kernel's peak RSS (the largest over rounds)
against the budget, the sampling s/image (the median; the run's own figure, after planning) and the whole
process's wall time per image (imports, load and planning included), and the speed-up over `min` in the
same round (median, range). First, unless --no-quick-start, the README's quick-start command as a new user
runs it (the default model, 16 images, a grid image, no other flag: DPM++ 20 under the default budget),
against the same command as it ran before the planner and the DPM++ default (DDIM 50, --memory-budget min),
and DDIM 50 under the default budget (what the planner alone buys).

    python benchmarks/budget_speed.py --rounds 3                      # shipped models + the 256x256 edge model
    python benchmarks/budget_speed.py --models faces64_2x2 --no-edge --no-quick-start --rounds 1 --steps 2 --out /tmp/b
    python benchmarks/budget_speed.py --models "" --no-edge --rounds 5 --out benchmarks/results/budget_speed_quick_start
"""
from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import click

from benchlib import RESULTS, random_model, refused_minimum, sample_cli, write_results


def settings(minimum: float) -> dict[str, list[str]]:
    """Setting name -> patchgen-sample arguments."""
    budgets = {"min": ["--memory-budget", "min"], "minimum": ["--memory-budget", f"{minimum:.1f}M"]}
    for more in (8, 32, 128):
        budgets[f"minimum + {more}M"] = ["--memory-budget", f"{minimum + more:.1f}M"]
    return {**budgets, "default (no flag)": []}


QUICK_START = ["--grid-image"]  # + the grid's path: `patchgen-sample --num-images 16 --grid-image grid.png`
BEFORE = "before: DDIM 50, --memory-budget min"  # the quick start before the planner and the DPM++ default
QUICK_START_SETTINGS = {BEFORE: (["--sampler", "ddim", "--memory-budget", "min"], 50),
                        "DDIM 50, default budget": (["--sampler", "ddim"], 50),
                        "now: no flag (DPM++ 20, default budget)": ([], None)}  # (arguments, --steps)


def quick_start_rows(tmp: Path, rounds: int) -> list[dict]:
    """The README's quick-start command (the default model, 16 images, a grid image, no --threads) as it runs
    now and as it ran before (QUICK_START_SETTINGS), interleaved: s/image and whole-process wall time per
    image; speed-up: BEFORE's wall time over the setting's in the same round."""
    runs: dict[str, list[dict]] = {setting: [] for setting in QUICK_START_SETTINGS}
    for r in range(rounds):
        for setting, (extra, steps) in QUICK_START_SETTINGS.items():
            run = sample_cli("faces64_2x2", tmp / "qs", *QUICK_START, str(tmp / "grid.png"), *extra, num_images=16,
                             steps=steps, threads=None)
            if run["returncode"] != 0:
                raise click.ClickException(f"quick start {setting}: {run['stderr'].strip()[-300:]}")
            runs[setting].append(run)
            click.echo(f"quick start round {r + 1} {setting}: {run['allocation']} x{run['patch_batch']} "
                       f"{run['threads']}t, {run['s_per_image']} s/image, wall {run['wall_s']:.1f} s")
    rows = []
    for setting, mine in runs.items():
        ratios = [base["wall_s"] / run["wall_s"] for base, run in zip(runs[BEFORE], mine)]
        rows.append({"model": "quick start: faces64_2x2, -n 16, --grid-image", "setting": setting,
                     "allocation": "/".join(sorted({run["allocation"] for run in mine})),
                     "patch_batch": "/".join(sorted({str(run["patch_batch"]) for run in mine}, key=int)),
                     "threads": "/".join(sorted({str(run["threads"]) for run in mine})),
                     "predicted_mib": max((run["predicted_mib"] or 0 for run in mine), default=0) or None,
                     "peak_mib": max(run["peak_mib"] for run in mine), "within": "-",
                     "s_per_image": statistics.median(run["s_per_image"] for run in mine),
                     "wall_per_image": statistics.median(run["wall_s"] / 16 for run in mine),
                     "speedup": statistics.median(ratios), "speedup_range": f"{min(ratios):.2f}-{max(ratios):.2f}",
                     "rounds": [{"s_per_image": run["s_per_image"], "peak_mib": run["peak_mib"],
                                 "wall_s": run["wall_s"]} for run in mine]})
    return rows


@click.command(epilog="Example: python benchmarks/budget_speed.py --rounds 3 --steps 10")
@click.option("--models", default="faces64_2x2,noto128_4x4", show_default=True,
              help="Comma-separated shipped model names or .onnx files.")
@click.option("--edge/--no-edge", default=True, show_default=True,
              help="Also the random-weight 256x256 4x4 edge model with halo 8, fp32 and int8.")
@click.option("--num-images", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="--threads for every run; 0 leaves it out (the planner measures thread counts).")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--quick-start/--no-quick-start", default=True, show_default=True,
              help="Also the README's quick-start command as a new user runs it (16 images, a grid image), "
                   "against the same as it ran before the planner and the DPM++ default (DDIM 50, --memory-budget "
                   "min).")
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS / "budget_speed", show_default=True)
def main(models, edge, num_images, steps, threads, rounds, quick_start, out):
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if quick_start:
            rows += quick_start_rows(tmp, rounds)
        chosen = [m for m in models.split(",") if m]
        if edge:
            for weights in ("fp32", "int8"):
                chosen.append(str(random_model(tmp / f"edge256_4x4_h8_{weights}.onnx", 256, 4, halo=8, weights=weights,
                                               calibration_data="emoji-faces" if weights == "int8" else None)))
        for model in chosen:
            name = Path(model).name
            minimum, runs = refused_minimum(model, tmp / "refused", num_images=num_images, steps=steps, threads=threads)
            if minimum is None:
                raise click.ClickException(f"{name}: expected 1M to be refused with the minimum: {runs[-1]['stderr']}")
            cells = settings(minimum)
            results: dict[str, list[dict]] = {k: [] for k in cells}
            for r in range(rounds):
                for setting, args in cells.items():
                    run = sample_cli(model, tmp / "out", "--sampler", "ddim", *args, num_images=num_images,
                                     steps=steps, threads=threads)
                    if run["returncode"] != 0:
                        raise click.ClickException(f"{name} {setting}: {run['stderr'].strip()[-300:]}")
                    results[setting].append(run)
                    click.echo(f"{name} round {r + 1} {setting}: {run['allocation']} x{run['patch_batch']} "
                               f"{run['threads']}t, "
                               f"{run['s_per_image']} s/image, peak {run['peak_mib']:.1f} MiB")
            for setting, runs in results.items():
                budget = cells[setting][1] if cells[setting][1:] and cells[setting][1] != "min" else None
                ratios = [base["s_per_image"] / run["s_per_image"] for base, run in zip(results["min"], runs)]
                peak = max(run["peak_mib"] for run in runs)
                predicted = [run["predicted_mib"] for run in runs if run["predicted_mib"]]
                budget_mib = float(budget.removesuffix("M")) if budget else None
                rows.append({
                    "model": name.removesuffix(".onnx"), "setting": setting, "budget_mib": budget_mib,
                    "allocation": "/".join(sorted({run["allocation"] for run in runs})),
                    "threads": "/".join(sorted({str(run["threads"]) for run in runs})),
                    "patch_batch": "/".join(sorted({str(run["patch_batch"]) for run in runs}, key=int)),
                    "predicted_mib": max(predicted) if predicted else None, "peak_mib": peak,
                    "within": "-" if budget_mib is None else ("yes" if peak <= budget_mib else "NO"),
                    "s_per_image": statistics.median(run["s_per_image"] for run in runs),
                    "wall_per_image": statistics.median(run["wall_s"] / num_images for run in runs),
                    "speedup": statistics.median(ratios), "speedup_range": f"{min(ratios):.2f}-{max(ratios):.2f}",
                    "rounds": [{"s_per_image": run["s_per_image"], "peak_mib": run["peak_mib"], "wall_s": run["wall_s"]}
                               for run in runs]})
    title = (f"What a memory budget buys: s/image against --memory-budget ({num_images} images, DDIM {steps} steps, "
             + (f"{threads} threads)" if threads else "threads: the planner's)") if chosen
             else "The README's quick-start command, before and now: wall time per image")
    write_results(out, title,
                  [("model", "model"), ("setting", "setting"), ("budget_mib", "budget (MiB)"),
                   ("allocation", "allocation"), ("patch_batch", "patches/call"), ("threads", "threads"), ("predicted_mib", "predicted peak"),
                   ("peak_mib", "peak RSS (MiB)"), ("within", "within"), ("s_per_image", "s/image"),
                   ("wall_per_image", "wall s/image"), ("speedup", "speed-up vs min"), ("speedup_range", "range")],
                  rows, notes=f"Each cell is a fresh `patchgen-sample` process; {rounds} rounds, every setting once per "
                              "round (interleaved). Peak RSS: the kernel's (ru_maxrss), the largest over rounds. s/image: "
                              "the run's own sampling time per image (after planning), the median; wall: the whole "
                              "process per image (imports, load, planning), the median. Speed-up: min's s/image over "
                              "this setting's in the same round, median and range (quick start: the first "
                              "setting's whole-process wall time over this one's, as a new user waits for it). "
                              "min: --memory-budget min (the "
                              "memory-first allocation, one patch per call: the behaviour before the planner). The "
                              "edge models have random weights (int8: calibrated on emoji-faces).")


if __name__ == "__main__":
    main()
