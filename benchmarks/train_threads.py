"""torch's intra-op threads for training on a small machine: `patchgen-train --threads N` for each N, on a quiet
machine and beside a competing load, in interleaved rounds (each run a fresh process), so the default comes
from data.

Each run trains the default recipe on the built-in faces (64x64, 2x2 patches, batch 16) for --steps steps,
no previews; its speed is the images of its steps after --warmup over their time (train_log.csv), so a
step stalled by the load counts as long as it took. The load is --load-procs processes that spin on the CPU
(one per core by default), started before the run and stopped after it: what a second job, a test suite or
a browser does to a training run on a shared board.

    python benchmarks/train_threads.py --rounds 3 --steps 30
"""
from __future__ import annotations

import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from benchlib import RESULTS, write_results

# Spins until stopped, or until the benchmark that started it (its argument) is gone: a benchmark killed
# mid-run leaves no load behind.
SPIN = """
import os, sys
while os.getppid() == int(sys.argv[1]):
    for _ in range(10**6):
        pass
"""
BATCH = 16  # patchgen-train's default --batch-size


def train_speed(threads: int | None, steps: int, warmup: int, tmp: Path, image_size: int) -> dict:
    """One fresh `patchgen-train` run: its images/s over the steps after `warmup` (all their images over all
    their time: a stalled step counts as long as it took), the median step's, and the wall seconds."""
    run = tmp / f"run_{threads}_{time.monotonic_ns()}"
    args = ["--data", "emoji-faces", "--image-size", str(image_size), "--max-steps", str(steps),
            "--batch-size", str(BATCH), "--preview-every", "0", "--out", str(run)]
    args += ["--threads", str(threads)] if threads else []
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "patchgen.cli.train", *args], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise click.ClickException(r.stderr[-2000:])
    with open(run / "train_log.csv", newline="") as f:
        speeds = [float(row["images_per_s"]) for row in csv.DictReader(f)][warmup:]
    seconds = sum(BATCH / v for v in speeds)
    return {"images_per_s": BATCH * len(speeds) / seconds, "median_step": statistics.median(speeds), "wall_s": wall}


def with_load(procs: int, fn):
    """fn() while `procs` CPU-spinning processes run."""
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN, str(os.getpid())]) for _ in range(procs)]
    try:
        time.sleep(0.5 if procs else 0)
        return fn()
    finally:
        for p in spinners:
            p.kill()
            p.wait()


@click.command(epilog="Example: python benchmarks/train_threads.py --rounds 3 --steps 30")
@click.option("--threads", "thread_counts", default="1,2", show_default=True,
              help="Comma-separated --threads values; 0 = torch's own choice (no --threads).")
@click.option("--load-procs", type=click.IntRange(min=1), default=2, show_default=True,
              help="CPU-spinning processes of the loaded setting.")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--steps", type=click.IntRange(min=2), default=30, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True,
              help="First steps left out (start-up).")
@click.option("--image-size", type=int, default=64, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS / "train_threads", show_default=True)
def main(thread_counts, load_procs, rounds, steps, warmup, image_size, out):
    """Training images/s for each torch thread count, quiet and under a competing load, interleaved."""
    counts = [int(t) for t in thread_counts.split(",")]
    loads = [0, load_procs]
    results = {(t, load): [] for load in loads for t in counts}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for load in loads:
                for t in (counts if r % 2 == 0 else counts[::-1]):  # alternate the order within a round
                    res = with_load(load, lambda: train_speed(t or None, steps, warmup, Path(tmp), image_size))
                    results[(t, load)].append(res)
                    click.echo(f"round {r + 1}, load {load}, threads {t or 'torch'}: "
                               f"{res['images_per_s']:.2f} img/s, {res['wall_s']:.0f} s", err=True)
    rows = []
    base = counts[0]
    for (t, load), runs in results.items():
        speeds = [x["images_per_s"] for x in runs]
        ratios = [x["images_per_s"] / b["images_per_s"] for x, b in zip(runs, results[(base, load)])]
        rows.append({"load": f"{load} spinning" if load else "quiet", "threads": t or "torch's default",
                     "images_per_s": statistics.median(speeds), "min": min(speeds), "max": max(speeds),
                     "median_step": statistics.median(x["median_step"] for x in runs),
                     "s_per_step": BATCH / statistics.median(speeds),
                     "wall_s": statistics.median(x["wall_s"] for x in runs),
                     "vs_base": statistics.median(ratios), "vs_base_range": f"{min(ratios):.2f}-{max(ratios):.2f}",
                     "speeds": speeds})
    write_results(out, f"Training speed by torch threads, quiet and loaded ({image_size}x{image_size} faces, the "
                       f"default recipe, batch 16; {rounds} interleaved rounds)",
                  [("load", "load"), ("threads", "--threads"), ("images_per_s", "images/s (median run)"),
                   ("min", "min"), ("max", "max"), ("s_per_step", "s/step"), ("median_step", "median step's images/s"),
                   ("wall_s", "wall s (median run)"),
                   ("vs_base", f"x --threads {base or 'torch'} (same round)"), ("vs_base_range", "range")], rows,
                  f"Each run a fresh `patchgen-train` of {steps} steps, no previews; its speed: the images of its "
                  f"steps after the first {warmup} over their time (train_log.csv), so a stalled step counts in "
                  f"full; wall: the whole command, start-up and data included. Loaded: {load_procs} processes "
                  "spinning on the CPU while the run trains. The ratio is to the first thread count in the same round "
                  "and load.")


if __name__ == "__main__":
    main()
