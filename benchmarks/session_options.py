"""Where the floor goes, and which onnxruntime / malloc settings give the lowest peak RSS.

Breaks one sampling process down into: interpreter + numpy + onnxruntime (after imports), session
machinery (a session on a tiny model), weights (the same network's session minus that), and activations
(peak minus floor). Then measures each memory option, each in a fresh process: onnxruntime's CPU arena,
memory pattern, weight prepacking, initializers through the device allocator, weights as external data,
and patchgen's glibc malloc tuning.

    python benchmarks/session_options.py --image-size 256 --grid 4
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import click

from benchlib import RESULTS, python, random_model, run_fresh, sample_run, write_results

EXTERNAL = r"""
import sys, onnx
m = onnx.load(sys.argv[1])
onnx.save_model(m, sys.argv[2], save_as_external_data=True, all_tensors_to_one_file=True,
                location=sys.argv[2].split("/")[-1] + ".data", size_threshold=1024)
"""

# onnxruntime's names (runtime/session.py, apply_overrides): its CPU arena and memory pattern, and two session
# config entries; "malloc_tuning" (patchgen's glibc settings) and "external" (this script's external-data copy
# of the model) are this benchmark's own.
ARENA, PATTERN = "enable_cpu_mem_arena", "enable_mem_pattern"
NO_PREPACKING = {"session.disable_prepacking": "1"}
VARIANTS = {  # every row names all its settings, so the table stays true when the runtime's defaults change
    "arena off, pattern off, malloc tuned": {ARENA: False, PATTERN: False},
    "arena off, pattern on, malloc tuned": {ARENA: False, PATTERN: True},
    "arena on, pattern off, malloc tuned": {ARENA: True, PATTERN: False},
    "arena on, pattern on, malloc tuned": {ARENA: True, PATTERN: True},
    "arena off, pattern off, prepacking off": {ARENA: False, PATTERN: False, **NO_PREPACKING},
    "arena off, pattern off, initializers via device allocator": {
        ARENA: False, PATTERN: False, "session.use_device_allocator_for_initializers": "1"},
    "arena off, pattern off, external data (mmap)": {ARENA: False, PATTERN: False, "external": True},
    "arena off, pattern off, external data, prepacking off": {ARENA: False, PATTERN: False, "external": True,
                                                              **NO_PREPACKING},
    "arena off, pattern off, malloc untuned": {ARENA: False, PATTERN: False, "malloc_tuning": False},
    "onnxruntime defaults (arena on, pattern on, malloc untuned)": {ARENA: True, PATTERN: True,
                                                                    "malloc_tuning": False},
}


def measure(model: Path, opts: dict, patch_batch: int, steps: int, threads: int, repeats: int) -> dict:
    row = sample_run(model, patch_batch, steps, threads, opts, repeats)
    if "error" in row:
        raise click.ClickException(row["error"])
    return row


def floor_breakdown(model: Path, tiny: Path, steps: int, threads: int) -> tuple[dict, list[dict]]:
    """(the `tiny` model's measurement, the rows of where `model`'s peak goes): imports, session machinery (the
    same graph at width 8), weights, the activations of one 1-patch call; runtime defaults."""
    t = measure(tiny, {}, 1, 1, threads, 1)
    d = measure(model, {}, 1, steps, threads, 1)
    return t, [
        {"part": "interpreter + numpy + onnxruntime + patchgen.runtime", "mib": t["imports_mib"]},
        {"part": f"session machinery (same graph at width 8, {tiny.stat().st_size / 2**20:.1f} MiB file)",
         "mib": t["floor_mib"] - t["imports_mib"]},
        {"part": f"weights ({model.stat().st_size / 2**20:.1f} MiB in the file, less the width-8 copy)",
         "mib": d["floor_mib"] - t["floor_mib"]},
        {"part": "activations of one 1-patch call (peak - floor)", "mib": d["peak_mib"] - d["floor_mib"]},
        {"part": "peak", "mib": d["peak_mib"]},
    ]


@click.command(epilog="Example: python benchmarks/session_options.py --image-size 256 --grid 4 --repeats 3")
@click.option("--image-size", type=int, default=256, show_default=True)
@click.option("--grid", type=int, default=4, show_default=True)
@click.option("--steps", type=int, default=3, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--base-width", type=int, default=32, show_default=True, help="U-Net width of the measured model.")
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS / "session_options", show_default=True)
def main(image_size, grid, steps, threads, repeats, base_width, out):
    """Floor breakdown and peak RSS / speed per memory option, at 1 patch and all patches per call."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = random_model(tmp / "edge.onnx", image_size, grid, base_width=base_width)
        # The same graph at width 8: (8 / base_width)^2 of the weights, the same nodes and kernels.
        tiny = random_model(tmp / "tiny.onnx", image_size, grid, base_width=8)
        external = tmp / "external.onnx"
        run_fresh(python("-c", EXTERNAL, str(model), str(external)))
        file_mib = model.stat().st_size / 2**20

        t, breakdown = floor_breakdown(model, tiny, steps, threads)
        write_results(out.with_name(out.name + "_floor"), f"Where the peak goes: {image_size}x{image_size}, "
                      f"{grid}x{grid} grid, base width {base_width}, 1 patch per call, runtime defaults",
                      [("part", "part"), ("mib", "MiB")], breakdown)
        for row in breakdown:
            click.echo(f"{row['part']:60s} {row['mib']:7.1f} MiB")

        rows = []
        for name, opts in VARIANTS.items():
            path = external if opts.get("external") else model
            opts = {k: v for k, v in opts.items() if k != "external"}
            one = measure(path, opts, 1, steps, threads, repeats)
            full = measure(path, opts, grid * grid, steps, threads, repeats)
            rows.append({"variant": name, "floor_mib": one["floor_mib"], "weights_mib": one["floor_mib"] - t["floor_mib"],
                         "peak1_mib": one["kernel_peak_mib"], "peak_all_mib": full["kernel_peak_mib"],
                         "s_step1": one["s_per_step"], "s_step_all": full["s_per_step"]})
            click.echo(f"{name:60s} floor {one['floor_mib']:6.1f}  peak@1 {one['kernel_peak_mib']:6.1f}  "
                       f"peak@{grid * grid} {full['kernel_peak_mib']:6.1f}  s/step {one['s_per_step']:.3f} / {full['s_per_step']:.3f}")
    write_results(out, f"Memory options: {image_size}x{image_size}, {grid}x{grid} grid, base width {base_width}, "
                       f"{threads} threads, {steps} DDIM steps; ONNX file {file_mib:.1f} MiB",
                  [("variant", "setting"), ("floor_mib", "floor (MiB)"), ("weights_mib", "weights resident (MiB)"),
                   ("peak1_mib", "peak, 1 patch/call"), ("peak_all_mib", f"peak, {grid * grid} patches/call"),
                   ("s_step1", "s/step, 1 patch"), ("s_step_all", f"s/step, {grid * grid}")], rows,
                  "Each cell is a fresh process; peak is the kernel's ru_maxrss, floor is VmRSS after the session "
                  "opens and one call has faulted in its (mapped) weights; weights resident = floor minus the "
                  "floor of the same graph at width 8; time is the "
                  f"fastest of {repeats}.")


if __name__ == "__main__":
    main()
