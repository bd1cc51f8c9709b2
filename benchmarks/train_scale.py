"""Training beyond one process, measured: peak RSS against the data set's size, with and without the image
cache, and throughput on 1 rank against 2 (torchrun) with the same global batch. Every setting runs in a
fresh process; peak RSS is the kernel's (ru_maxrss of the child, and VmHWM / RssAnon / RssFile it reports).

    python benchmarks/train_scale.py --sizes 1000,50000 --steps 10 --rounds 3
    python benchmarks/train_scale.py --sizes 20 --steps 4 --rounds 1 --image-size 16 --base-width 8 \
        --batch-size 4 --work /tmp/scale --out /tmp/scale        # a smoke run: a tiny model, seconds

The image folders (64x64 PNGs, made once) and the cache go under --work.
"""
from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import click

from benchlib import RESULTS, python, run_fresh, write_results

MAKE_FOLDER = r"""
import sys
from pathlib import Path
import numpy as np
from PIL import Image
folder, n, s = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
folder.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(n)
yy, xx = np.mgrid[:s, :s]
for i in range(n):  # a coloured disc on a noisy background: realistic PNG sizes, every image different
    img = rng.integers(150, 256, (s, s, 3), dtype=np.uint8)
    cy, cx, r = rng.uniform(s / 4, 3 * s / 4, 2).tolist() + [rng.uniform(s / 8, s / 3)]
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 150, 3)
    Image.fromarray(img).save(folder / f"{i:06d}.png")
"""

# One training process: load the folder (cache or memory), train a few steps, report memory from /proc.
TRAIN_CHILD = r"""
import json, sys, time
from pathlib import Path
def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
folder, cache, steps, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
size, width, batch = map(int, sys.argv[5:8])
import torch
from patchgen.models.decoding import Decoding
from patchgen.models.config import ModelConfig, TrainConfig
from patchgen.models.data import load_data
from patchgen.models.train import train
from patchgen.runtime.limits import available_cpus
torch.set_num_threads(1)
t0 = time.perf_counter()
data = load_data(folder, size, decoding=Decoding(Path(cache) if cache != "-" else None, available_cpus()))
load_s = time.perf_counter() - t0
after_load = status("VmRSS")
t0 = time.perf_counter()
train(out, steps, data=data, config=ModelConfig(image_size=size, grid=2, base_width=width),
      train_config=TrainConfig(batch_size=batch), holdout=0.01, preview_every=0, checkpoint_every=10**6)
print(json.dumps({"images": len(data.images), "load_s": load_s, "after_load_mib": after_load,
                  "train_s_per_step": (time.perf_counter() - t0) / steps, "vmhwm_mib": status("VmHWM"),
                  "rss_anon_mib": status("RssAnon"), "rss_file_mib": status("RssFile")}))
"""

RANKS_ARGS = ["--grid", "2", "--preview-every", "0", "--checkpoint-every", "1000000"]


def image_folder(work: Path, n: int, size: int) -> Path:
    """n generated size x size PNGs, written once."""
    folder = work / f"images{n}_{size}"
    if not (folder / f"{n - 1:06d}.png").exists():
        click.echo(f"writing {n} images to {folder} ...")
        r = run_fresh(python("-c", MAKE_FOLDER, str(folder), str(n), str(size)))
        if r["returncode"]:
            raise click.ClickException(r["stderr"][-2000:])
    return folder


MEMORY_MODES = (("memory (--no-cache)", False), ("cache: build, then map", True), ("cache: map", True))


def memory_rows(work: Path, sizes: list[int], steps: int, rounds: int, image_size: int, width: int,
                batch: int) -> list[dict]:
    """Every (size, mode) once per round, interleaved; one row per (size, mode) with the median of each figure
    over the rounds, the peak's range, and the rounds themselves (JSON)."""
    folders = {n: image_folder(work, n, image_size) for n in sizes}
    runs = {}
    for round_ in range(rounds):
        for n in sizes:
            cache = work / "cache"
            shutil.rmtree(cache, ignore_errors=True)  # the build row builds it
            for mode, cached in MEMORY_MODES:
                out = work / "run"
                shutil.rmtree(out, ignore_errors=True)
                r = run_fresh(python("-c", TRAIN_CHILD, str(folders[n]), str(cache) if cached else "-", str(steps),
                                     str(out), str(image_size), str(width), str(batch)))
                if r["returncode"]:
                    raise click.ClickException(r["stderr"][-2000:])
                row = {**json.loads(r["stdout"]), "peak_mib": r["peak_mib"]}
                click.echo(f"round {round_ + 1}, {n} images, {mode}: after load {row['after_load_mib']:.0f} MiB, "
                           f"peak {row['peak_mib']:.0f} MiB, load {row['load_s']:.1f} s")
                runs.setdefault((n, mode), []).append(row)
    rows = []
    for (n, mode), measured in runs.items():
        row = {"images": n, "mode": mode, "rounds": measured}
        for key in ("load_s", "after_load_mib", "peak_mib", "rss_anon_mib", "rss_file_mib", "train_s_per_step"):
            row[key] = statistics.median(m[key] for m in measured)
        peaks = [m["peak_mib"] for m in measured]
        row["peak_range"] = f"{min(peaks):.0f}–{max(peaks):.0f}"
        rows.append(row)
    return rows


def ranks_rows(work: Path, n: int, steps: int, rounds: int, image_size: int, width: int, batch: int) -> list[dict]:
    """1 process x 2 threads, 1 process x 1 thread and torchrun 2 ranks x 1 thread, same global batch,
    interleaved over `rounds`, on n images; images/s from the median step time after the first 3 steps."""
    folder = image_folder(work, n, image_size)
    settings = {
        "1 rank x 2 threads": python("-m", "patchgen.cli.train", "--threads", "2"),
        "1 rank x 1 thread": python("-m", "patchgen.cli.train", "--threads", "1"),
        "2 ranks x 1 thread (torchrun)": python("-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                                "2", "-m", "patchgen.cli.train"),
    }
    rows = []
    for round_ in range(rounds):
        for name, command in settings.items():
            out = work / "ranks_run"
            shutil.rmtree(out, ignore_errors=True)
            r = run_fresh([*command, "--data", str(folder), "--image-size", str(image_size), "--base-width",
                           str(width), "--batch-size", str(batch), *RANKS_ARGS,
                           "--max-steps", str(steps), "--out", str(out),
                           "--cache-dir", str(work / "cache")], env={"OMP_NUM_THREADS": "1"})
            if r["returncode"]:
                raise click.ClickException(r["stderr"][-2000:])
            speeds = sorted(float(line.split(",")[3]) for line in (out / "train_log.csv").read_text().splitlines()[4:])
            row = {"round": round_ + 1, "setting": name, "images_per_s": speeds[len(speeds) // 2]}
            click.echo(f"round {round_ + 1}, {name}: {row['images_per_s']:.1f} images/s")
            rows.append(row)
    reference = {r["round"]: r["images_per_s"] for r in rows if r["setting"] == next(iter(settings))}
    for r in rows:
        r["vs_reference"] = r["images_per_s"] / reference[r["round"]]
    for name in settings:  # the medians over the rounds
        mine = [r for r in rows if r["setting"] == name]
        rows.append({"round": "median", "setting": name,
                     "images_per_s": statistics.median(r["images_per_s"] for r in mine),
                     "vs_reference": statistics.median(r["vs_reference"] for r in mine)})
    return rows


def model_name(width: int) -> str:
    return "default model" if width == 32 else f"default model at base width {width}"


@click.command(epilog="Example: python benchmarks/train_scale.py --sizes 1000,50000 --steps 10 --rounds 3")
@click.option("--sizes", default="1000,50000", show_default=True, help="Comma-separated data set sizes (64x64).")
@click.option("--steps", type=click.IntRange(min=4), default=10, show_default=True, help="Training steps per run.")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Interleaved rounds of every setting.")
@click.option("--image-size", type=click.IntRange(min=8), default=64, show_default=True)
@click.option("--base-width", type=click.IntRange(min=8), default=32, show_default=True,
              help="U-Net channels at the first level: 32 is the default model; 8 makes a smoke run quick.")
@click.option("--batch-size", type=click.IntRange(min=2), default=16, show_default=True,
              help="Global batch (even: 2 ranks share it).")
@click.option("--part", type=click.Choice(["memory", "ranks", "both"]), default="both", show_default=True)
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=Path("/tmp/patchgen-train-scale"),
              show_default=True, help="Image folders, cache and run folders.")
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS / "train_scale", show_default=True,
              help="Results stem: STEM_memory.{json,md} and STEM_ranks.{json,md}.")
def main(sizes, steps, rounds, image_size, base_width, batch_size, part, work, out):
    """Peak RSS vs data set size (memory or cache) and images/s on 1 vs 2 ranks."""
    work.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in sizes.split(",")]
    if part in ("memory", "both"):
        rows = memory_rows(work, sizes, steps, rounds, image_size, base_width, batch_size)
        write_results(out.with_name(out.name + "_memory"),
                      f"Training RSS vs data set size: {image_size}x{image_size} PNGs, 2x2 {model_name(base_width)}, "
                      f"batch {batch_size}, {steps} steps",
                      [("images", "images"), ("mode", "images held"), ("load_s", "load (s)"),
                       ("after_load_mib", "RSS after load (MiB)"), ("peak_mib", "peak RSS (MiB)"),
                       ("peak_range", "peak range"),
                       ("rss_anon_mib", "RssAnon at end"), ("rss_file_mib", "RssFile at end"),
                       ("train_s_per_step", "s/step")], rows,
                      f"Each run a fresh process, every setting once per round over {rounds} interleaved rounds; "
                      "the medians (the peak's range beside it). RSS after load is VmRSS once the images are loaded, "
                      "before training; peak RSS is the kernel's ru_maxrss of the child, reached in training "
                      "(autograd's activations dominate it; the range column shows how much it varies between runs). "
                      "'cache: build, then map' decodes the folder in worker "
                      "processes into the cache and maps it; 'cache: map' is the next run, which decodes nothing. "
                      "RssFile counts the pages of the mapped cache this process has touched: page cache, shared "
                      "by every rank on the machine and dropped by the kernel under memory pressure.")
    if part in ("ranks", "both"):
        rows = ranks_rows(work, sizes[0], max(steps, 12), rounds, image_size, base_width, batch_size)
        write_results(out.with_name(out.name + "_ranks"),
                      f"Training throughput: 1 rank vs 2 ranks (torchrun, gloo), {image_size}x{image_size}, 2x2 "
                      f"{model_name(base_width)}, global batch {batch_size}",
                      [("round", "round"), ("setting", "setting"), ("images_per_s", "images/s"),
                       ("vs_reference", "vs 1 rank x 2 threads, same round")], rows,
                      f"{sizes[0]} images. Interleaved rounds, each setting a fresh process (group); images/s is the "
                      "median over the "
                      "steps after the third, from train_log.csv. Same global batch, so the same run at any "
                      "world size.")


if __name__ == "__main__":
    main()
