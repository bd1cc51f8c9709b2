"""The headline: patchgen's patch sampling against the full image in onnxruntime and in PyTorch eager.

The same random-weight network (edge width) at one image size: PyTorch eager on the full image (what a
diffusers DDPMPipeline user runs), onnxruntime on the full image (1x1), and patchgen at 2x2, 4x4, 8x8,
one patch per call (memory-first: `--memory-budget min`); then the edge benchmark model, 4x4 with a halo
(--halo), at one patch per call and under the default budget (the planner's choice), and its int8
export (the same checkpoint) under the default budget. All in one run, each in a fresh process, the
settings interleaved round by round. s/image is the sampling loop's (after loading and planning: the
planner's start-up cost is its own column). Also the bare cost of importing torch against numpy +
onnxruntime.

    python benchmarks/vs_pytorch.py --image-size 256 --steps 10 --repeats 3
"""
from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

import click

from benchlib import RESULTS, python, random_model, run_fresh, sample_run, write_results
from precision import export

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


@click.command(epilog="Example: python benchmarks/vs_pytorch.py --image-size 256 --steps 10 --repeats 3")
@click.option("--image-size", type=int, default=256, show_default=True)
@click.option("--grids", default="2,4,8", show_default=True, help="Patch grids besides the full image.")
@click.option("--steps", type=int, default=10, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--halo", type=click.IntRange(min=0), default=8, show_default=True,
              help="The edge model's halo (4x4 grid); 0 leaves its rows out.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Interleaved rounds: every setting runs once per round; times are medians.")
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS / "vs_pytorch", show_default=True)
def main(image_size, grids, steps, threads, halo, repeats, out):
    """Time per image and peak RSS: PyTorch eager, onnxruntime full image, patchgen per grid."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        full = random_model(tmp / "full.onnx", image_size, 1, keep_checkpoint=True)

        def torch_run() -> dict:
            r = run_fresh(python("-c", TORCH_CHILD, str(full.with_suffix(".pt")), str(steps), str(threads)))
            if r["returncode"]:
                raise click.ClickException(r["stderr"][-1500:])
            return {**json.loads(r["stdout"]), "kernel_peak_mib": r["peak_mib"]}

        settings = [("PyTorch eager, full image", "1x1", torch_run),
                    ("onnxruntime, full image", "1x1", lambda: sample_run(full, 1, steps, threads))]
        for g in (int(g) for g in grids.split(",")):
            model = random_model(tmp / f"g{g}.onnx", image_size, g)
            settings.append((f"patchgen {g}x{g}, 1 patch/call", f"{g}x{g}",
                             lambda model=model: sample_run(model, 1, steps, threads)))
        if halo:
            edge = random_model(tmp / "edge.onnx", image_size, 4, keep_checkpoint=True, halo=halo)
            int8 = tmp / "edge_int8.onnx"
            export(edge.with_suffix(".pt"), int8, "int8", "emoji-faces")
            where = f"4x4 halo {halo}"
            settings += [(f"patchgen {where}, 1 patch/call", where, lambda: sample_run(edge, 1, steps, threads)),
                         (f"patchgen {where}, default budget", where, lambda: sample_run(edge, 0, steps, threads)),
                         (f"patchgen {where} int8, default budget", where,
                          lambda: sample_run(int8, 0, steps, threads))]
        # Interleaved rounds (every setting once per round): the shared machine's swings hit all settings alike,
        # and each ratio is taken within a round.
        runs = {name: [] for name, _, _ in settings}
        for k in range(repeats):
            for name, _, run in settings:
                r = run()
                if "error" in r:
                    raise click.ClickException(f"{name}: {r['error']}")
                runs[name].append(r)
            click.echo(f"round {k + 1}/{repeats}: " + ", ".join(f"{n} {runs[n][-1]['s_per_step'] * steps:.2f} s"
                                                                 for n, _, _ in settings))
        torch_name, ort_name = settings[0][0], settings[1][0]
        for name, grid, _ in settings:
            mine = [r["s_per_step"] for r in runs[name]]
            vs_torch = [t["s_per_step"] / m for t, m in zip(runs[torch_name], mine)]
            vs_ort = [m / o["s_per_step"] for m, o in zip(mine, runs[ort_name])]
            peak = max(r["kernel_peak_mib"] for r in runs[name])
            rows.append({"setting": name, "grid": grid, "peak_mib": peak,
                         "floor_mib": min(r["floor_mib"] for r in runs[name]),
                         "s_per_image": statistics.median(mine) * steps,
                         "peak_vs_ort_full": peak / max(r["kernel_peak_mib"] for r in runs[ort_name]),
                         "time_vs_ort_full": statistics.median(vs_ort),
                         "speedup_vs_torch": statistics.median(vs_torch),
                         "speedup_range": f"{min(vs_torch):.2f}-{max(vs_torch):.2f}",
                         "plan": "/".join(sorted({f"{r['allocation']} x{r['patch_batch']}, {r['threads']}t"
                                                  for r in runs[name] if r.get("allocation")})),
                         "plan_s": statistics.median(r["plan_s"] for r in runs[name]) if "plan_s" in runs[name][0]
                         else None})
            click.echo(f"{name:34s} peak {peak:7.1f} MiB  {statistics.median(mine) * steps:6.2f} s/image, "
                       f"{statistics.median(vs_torch):.2f}x PyTorch's speed ({min(vs_torch):.2f}-{max(vs_torch):.2f})")
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
                   ("time_vs_ort_full", "time / ORT full"), ("speedup_vs_torch", "speed-up vs PyTorch"),
                   ("speedup_range", "speed-up range"), ("plan", "allocation x patches/call, threads"),
                   ("plan_s", "planning (s)")],
                  rows + imports,
                  f"Each cell is a fresh process; {repeats} rounds, every setting once per round (interleaved); peak "
                  f"is the kernel's ru_maxrss (the largest); s/image the median; the ratios are the medians of the "
                  f"per-round ratios, with the range over rounds. "
                  "Import rows: seconds to import, and the peak RSS of a process that only imports.")


if __name__ == "__main__":
    main()
