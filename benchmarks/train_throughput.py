"""Training throughput (images/s) of the default patch U-Net per grid and precision, each in a fresh process.

    python benchmarks/train_throughput.py --image-size 64 --grids 1,2,4 --steps 30
    python benchmarks/train_throughput.py --grids 1,2 --precisions fp32,bf16 --threads 1 --steps 20 \
        --out benchmarks/results/train_bf16
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from benchlib import RESULTS, python, run_fresh, write_results

CHILD = r"""
import json, sys, time
import numpy as np, torch
from patchgen.models.config import ModelConfig, TrainConfig
from patchgen.models.train import new_state, train_step
size, grid, steps, warmup, batch, threads = map(int, sys.argv[1:7])
bf16 = sys.argv[7] == "bf16"
torch.set_num_threads(threads)
config = ModelConfig(image_size=size, grid=grid, use_position=grid > 1)
train_config = TrainConfig(batch_size=batch)
images = np.random.default_rng(0).integers(0, 256, (256, size, size, 3), dtype=np.uint8)
state = new_state(config, train_config)
for _ in range(warmup):
    train_step(state, images, train_config, bf16)
t0 = time.perf_counter()
for _ in range(steps):
    train_step(state, images, train_config, bf16)
dt = time.perf_counter() - t0
print(json.dumps({"grid": grid, "precision": sys.argv[7], "image_size": size, "batch_size": batch, "steps": steps,
                  "params": sum(p.numel() for p in state.net.parameters()),
                  "images_per_s": steps * batch / dt, "s_per_step": dt / steps}))
"""


@click.command(epilog="Example: python benchmarks/train_throughput.py --image-size 64 --grids 1,2,4")
@click.option("--image-size", type=click.IntRange(min=8), default=64, show_default=True)
@click.option("--grids", default="1,2,4", show_default=True, help="Comma-separated grids, each in a fresh process.")
@click.option("--steps", type=click.IntRange(min=1), default=30, show_default=True, help="Timed steps.")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True, help="Untimed steps first.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--precisions", default="fp32", show_default=True, help="Comma-separated: fp32, bf16 (autocast).")
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS / "train_throughput", show_default=True,
              help="Results stem: writes STEM.json and STEM.md.")
def main(image_size, grids, steps, warmup, batch_size, threads, precisions, out):
    """Images/s of DDPM training (default model, all patches per image) for each grid and precision."""
    rows = []
    for grid in (int(g) for g in grids.split(",")):
        for precision in precisions.split(","):
            r = run_fresh(python("-c", CHILD, *map(str, (image_size, grid, steps, warmup, batch_size, threads)),
                                 precision))
            if r["returncode"]:
                raise click.ClickException(r["stderr"][-2000:])
            row = json.loads(r["stdout"])
            row["params_m"] = row["params"] / 1e6
            click.echo(f"grid {grid}, {precision}: {row['images_per_s']:.1f} images/s ({row['params_m']:.2f} M params)")
            rows.append(row)
    write_results(out, f"Training throughput at {image_size}x{image_size}, batch {batch_size} images, all patches "
                       f"per image, default model, torch threads {threads}",
                  [("grid", "grid"), ("precision", "precision"), ("params_m", "params (M)"),
                   ("images_per_s", "images/s"), ("s_per_step", "s/step")], rows,
                  "Each grid and precision in a fresh process; mean over the timed steps.")

if __name__ == "__main__":
    main()
