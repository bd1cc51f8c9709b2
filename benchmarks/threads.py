"""Thread scaling: seconds per step and peak RSS at 1, 2, ... onnxruntime threads.

    python benchmarks/threads.py --image-size 256 --grids 1,4
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import click

from benchlib import RESULTS, random_model, sample_run, write_results


@click.command(epilog="Example: python benchmarks/threads.py --image-size 256 --grids 1,4 --steps 3")
@click.option("--image-size", type=int, default=256, show_default=True)
@click.option("--grids", default="1,4", show_default=True)
@click.option("--threads", "max_threads", type=int, default=os.cpu_count() or 1, show_default=True, help="Up to this many.")
@click.option("--steps", type=int, default=3, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS / "threads", show_default=True)
def main(image_size, grids, max_threads, steps, repeats, out):
    """Each (grid, threads) in a fresh process, one patch per call."""
    counts = sorted({1, 2, 4, max_threads} & set(range(1, max_threads + 1)))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for grid in (int(g) for g in grids.split(",")):
            model = random_model(Path(tmp) / f"g{grid}.onnx", image_size, grid)
            base = None
            for n in counts:
                r = sample_run(model, 1, steps, n, repeats=repeats)
                base = base or r["s_per_step"]
                rows.append({"grid": f"{grid}x{grid}", "threads": n, "s_per_step": r["s_per_step"],
                             "speedup": base / r["s_per_step"], "peak_mib": r["kernel_peak_mib"]})
                click.echo(f"{grid}x{grid}, {n} threads: {r['s_per_step']:.3f} s/step, peak {r['kernel_peak_mib']:.1f} MiB")
    write_results(out, f"Thread scaling: {image_size}x{image_size}, edge model, 1 patch per call, {steps} DDIM steps",
                  [("grid", "grid"), ("threads", "threads"), ("s_per_step", "s/step"), ("speedup", "speed-up"),
                   ("peak_mib", "peak RSS (MiB)")], rows,
                  f"Fresh process per row; time is the fastest of {repeats}.")


if __name__ == "__main__":
    main()
