"""The headline: patchgen's patch sampling against the full image in onnxruntime and in PyTorch eager.

The same random-weight network (edge width) at one image size: PyTorch eager on the full image (what a
diffusers DDPMPipeline user runs), onnxruntime on the full image (1x1), and patchgen at 2x2, 4x4, 8x8,
one patch per call; all in one run, each in a fresh process. Also the bare cost of importing torch
against numpy + onnxruntime.

    python benchmarks/vs_pytorch.py --image-size 256 --steps 10
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click

from benchlib import RESULTS, python, random_model, run_fresh, sample_run, write_results

TORCH_CHILD = r"""
import json, sys, time
from pathlib import Path
def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
ckpt, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
import torch
torch.set_num_threads(threads)
from patchgen.models.checkpoint import load_checkpoint, model_from_checkpoint
from patchgen.models.sample import sample_torch
net = model_from_checkpoint(load_checkpoint(ckpt))
floor = status("VmRSS")
with torch.inference_mode():
    t0 = time.perf_counter()
    sample_torch(net, 1, seed=0, steps=steps)
print(json.dumps({"floor_mib": floor, "peak_mib": status("VmHWM"), "s_per_step": (time.perf_counter() - t0) / steps}))
"""

IMPORT_CHILD = r"""
import sys, time
t0 = time.perf_counter()
for name in sys.argv[1].split(","):
    __import__(name)
dt = time.perf_counter() - t0
from pathlib import Path
hwm = [l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM")][0].split()[1]
print(dt, int(hwm) / 1024)
"""


@click.command(epilog="Example: python benchmarks/vs_pytorch.py --image-size 256 --steps 10 --repeats 2")
@click.option("--image-size", type=int, default=256, show_default=True)
@click.option("--grids", default="2,4,8", show_default=True, help="Patch grids besides the full image.")
@click.option("--steps", type=int, default=10, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=2, show_default=True, help="Time: the fastest of these.")
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS / "vs_pytorch", show_default=True)
def main(image_size, grids, steps, threads, repeats, out):
    """Time per image and peak RSS: PyTorch eager, onnxruntime full image, patchgen per grid."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        full = random_model(tmp / "full.onnx", image_size, 1, keep_checkpoint=True)
        best = None
        for _ in range(repeats):
            r = run_fresh(python("-c", TORCH_CHILD, str(full.with_suffix(".pt")), str(steps), str(threads)))
            if r["returncode"]:
                raise click.ClickException(r["stderr"][-1500:])
            row = {**json.loads(r["stdout"]), "kernel_peak_mib": r["peak_mib"]}
            best = row if best is None or row["s_per_step"] < best["s_per_step"] else best
        runs = [("PyTorch eager, full image", "1x1", best)]
        runs.append(("onnxruntime, full image", "1x1", sample_run(full, 1, steps, threads, repeats=repeats)))
        for g in (int(g) for g in grids.split(",")):
            model = random_model(tmp / f"g{g}.onnx", image_size, g)
            runs.append((f"patchgen {g}x{g}, 1 patch/call", f"{g}x{g}", sample_run(model, 1, steps, threads,
                                                                                  repeats=repeats)))
        ort_full = runs[1][2]
        for name, grid, r in runs:
            rows.append({"setting": name, "grid": grid, "peak_mib": r["kernel_peak_mib"], "floor_mib": r["floor_mib"],
                         "s_per_image": r["s_per_step"] * steps, "peak_vs_ort_full": r["kernel_peak_mib"] / ort_full["kernel_peak_mib"],
                         "time_vs_ort_full": r["s_per_step"] / ort_full["s_per_step"],
                         "speedup_vs_torch": best["s_per_step"] / r["s_per_step"]})
            click.echo(f"{name:34s} peak {r['kernel_peak_mib']:7.1f} MiB  {r['s_per_step'] * steps:6.2f} s/image")
    imports = []
    for label, modules in (("numpy + onnxruntime", "numpy,onnxruntime"), ("torch", "torch"),
                           ("patchgen.runtime (edge path)", "patchgen.runtime.generate")):
        r = run_fresh(python("-c", IMPORT_CHILD, modules))
        seconds, hwm = r["stdout"].split()
        imports.append({"setting": f"import {label}", "peak_mib": r["peak_mib"], "s_per_image": float(seconds)})
        click.echo(f"import {label:30s} {float(seconds):.2f} s, peak {r['peak_mib']:.1f} MiB")
    write_results(out, f"patchgen vs full-image onnxruntime vs PyTorch eager: {image_size}x{image_size}, {steps} DDIM "
                       f"steps, {threads} threads, edge-width U-Net (random weights)",
                  [("setting", "setting"), ("peak_mib", "peak RSS (MiB)"), ("floor_mib", "floor (MiB)"),
                   ("s_per_image", f"s/image ({steps} steps)"), ("peak_vs_ort_full", "peak / ORT full"),
                   ("time_vs_ort_full", "time / ORT full"), ("speedup_vs_torch", "speed-up vs PyTorch")],
                  rows + imports,
                  f"Each row is a fresh process; peak is the kernel's ru_maxrss; time is the fastest of {repeats}. "
                  "Import rows: seconds to import, and the peak RSS of a process that only imports.")


if __name__ == "__main__":
    main()
