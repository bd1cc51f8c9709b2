"""fp32 against fp16 and int8 files of the same model: file size, peak RSS, time per step, and which kernels run.

For each model (a checkpoint; a random-weight 256x256 4x4 edge model by default besides the given ones) the
files are exported (fp32, fp16, int8 U8S8, int8 S8S8), then sampled in fresh processes, interleaved
(fp32 fp16 int8 ..., fp32 ...) for --rounds rounds, so that the shared machine's swings hit every setting alike. Reported: the median
s/step, and per setting the median and the range over the rounds of its ratio to fp32 in the same round.
Kernels: the op types of onnxruntime's optimised graph (QLinearConv means int8 convolutions), and the
CPU's int8 dot-product flags. Sample quality (KID, seam) at 1000 samples: benchmarks/quality.py on the files.

    python benchmarks/precision.py --checkpoint runs/faces64h8/g2/checkpoint.pt --rounds 5 --steps 10 --allocation all
"""
from __future__ import annotations

import json
import statistics
import subprocess
import tempfile
from pathlib import Path

import click

from benchlib import RESULTS, export_cli, python, random_model, sample_run, write_results

# setting -> patchgen-export arguments; int8 is U8S8 (the default), int8-s8s8 signed activations
SETTINGS = {"fp32": [], "fp16": ["--precision", "fp16"], "int8": ["--quantize", "int8"],
            "int8-s8s8": ["--quantize", "int8", "--int8-activations", "int8"]}

# How a sampling process allocates (benchlib.sample_run's opts): patchgen's memory-first session settings
# (runtime/session.py: arena off, mmap-backed blocks from 64 KiB, so each call maps fresh pages) or
# onnxruntime's own defaults (arena and memory pattern on, glibc untuned), the fastest but not budgetable.
ALLOCATIONS = {"patchgen": {},
               "onnxruntime": {"enable_cpu_mem_arena": True, "enable_mem_pattern": True, "malloc_tuning": False},
               "planner": {}}
PLANNED = ("planner",)  # the planner's choice under the default budget (patch batch 0 to benchlib.SAMPLE_CHILD)

KERNELS_CHILD = r"""
import collections, json, sys, tempfile, onnx, onnxruntime as ort
so = ort.SessionOptions()
so.optimized_model_filepath = tempfile.mktemp(suffix=".onnx")
ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
ops = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
print(json.dumps(dict(ops.most_common())))
"""


def export(checkpoint: Path, out: Path, weights: str, calibration_data: str | None) -> dict:
    """`checkpoint` exported to `out` as the SETTINGS `weights` say (benchlib.export_cli): its --report."""
    args = list(SETTINGS[weights])
    if weights != "fp32" and calibration_data:
        args += ["--calibration-data", calibration_data]
    r = export_cli(checkpoint, out, *args)
    report = r["report"] or {}
    if r["returncode"] or report.get("status") != "done":
        why = (report.get("error") or {}).get("message") or r["stderr"].strip()[-400:]  # no report: what it said
        raise click.ClickException(f"export {weights} of {checkpoint} failed: {why}")
    click.echo(f"{out.name}: {parity_line(report['parity'])}")
    return report


def parity_line(parity: dict) -> str:
    """An export report's parity member as one line: each error measured, against its limit."""
    if not parity["checked"]:
        return "parity not checked"
    line = f"max error {parity['max_error']:.2e} (limit {parity['max_error_tolerance']:g})"
    if parity["rms_error"] is not None:
        line += f", RMS error {parity['rms_error']:.2e} (limit {parity['rms_error_tolerance']:g})"
    return f"parity in the model's own parametrisation ({parity['prediction']}): {line}"


def weight_settings(ctx, param, value: str) -> list[str]:
    """--weights: names of SETTINGS, comma-separated; fp32, the reference of every ratio, among them."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    if "fp32" not in names or any(n not in SETTINGS for n in names):
        raise click.BadParameter(f"names from {','.join(SETTINGS)}, fp32 among them; got {value!r}")
    return names


def cpu_flags() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    have = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8") if f in flags]
    return ", ".join(have) or "none of avx2/avx512/vnni"


def export_all(sources: list[tuple[str, Path, str | None]], settings: list[str],
               folder: Path) -> tuple[dict, dict]:
    """(name, weights) -> the file of each (name, checkpoint, calibration data) source exported at each of
    `settings` (names of SETTINGS) into `folder`, and -> its bytes (external data included), as its report says."""
    files, sizes = {}, {}
    for name, ckpt, calibration in sources:
        stem = name.split()[0]
        for w in settings:
            files[name, w] = folder / f"{stem}_{w}.onnx"
            report = export(ckpt, files[name, w], w, calibration)
            sizes[name, w] = sum(f["bytes"] for f in report["files"])
    return files, sizes


def timed_rounds(files: dict, allocations: list[str], rounds: int, steps: int, threads: int,
                 patch_batch: int) -> tuple[list, dict, dict, dict]:
    """(the cells (name, weights, allocation); per cell, its s/step and peak RSS of every round, and the plans
    the planner chose): every cell once per round, interleaved, each a fresh process (benchlib.sample_run)."""
    cells = [(name, w, a) for a in allocations for name, w in files]
    times: dict = {key: [] for key in cells}
    peaks: dict = {key: [] for key in cells}
    plans: dict = {key: set() for key in cells}
    for r in range(rounds):
        for key in cells:  # interleaved: every setting once per round
            row = sample_run(files[key[:2]], 0 if key[2] in PLANNED else patch_batch, steps, threads,
                             ALLOCATIONS[key[2]])
            if "error" in row:
                raise click.ClickException(f"{files[key[:2]].name}: {row['error']}")
            times[key].append(row["s_per_step"])
            if key[2] in PLANNED:
                plans[key].add(f"{row['allocation']} x{row['patch_batch']}")
            peaks[key].append(row["kernel_peak_mib"])
        click.echo(f"round {r + 1}/{rounds}: "
                   + ", ".join(f"{files[k[:2]].stem} ({k[2]}) {times[k][-1]:.3f}" for k in cells))
    return cells, times, peaks, plans


def precision_row(files: dict, sizes: dict, cell: tuple[str, str, str], times: dict, peaks: dict,
                  plans: dict) -> dict:
    """The table's row of one cell: file size, peak RSS, s/step, the speed-up against fp32 in the same rounds,
    and the kernels in onnxruntime's optimised graph."""
    name, w, a = cell
    path = files[name, w]
    ratios = [f / x for f, x in zip(times[name, "fp32", a], times[cell])]  # > 1: faster than fp32
    kernels = json.loads(subprocess.run(python("-c", KERNELS_CHILD, str(path)), capture_output=True,
                                        text=True, check=True).stdout)
    return {"model": name, "weights": w, "allocation": a, "plan": "/".join(sorted(plans[cell])),
            "file_mb": sizes[name, w] / 1e6, "size_vs_fp32": sizes[name, w] / sizes[name, "fp32"],
            "peak_mib": max(peaks[cell]), "s_per_step": statistics.median(times[cell]),
            "speedup": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios),
            "kernels": ", ".join(f"{k} {v}" for k, v in kernels.items()
                                 if k in ("Conv", "QLinearConv", "ConvInteger", "MatMul", "QLinearMatMul",
                                          "MatMulInteger", "Cast", "QuantizeLinear", "DequantizeLinear",
                                          "FusedConv", "NhwcFusedConv", "QGemm"))}


@click.command(epilog="Example: python benchmarks/precision.py --checkpoint runs/faces64h8/g2/checkpoint.pt")
@click.option("--checkpoint", "checkpoints", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="A trained checkpoint (repeatable); its own training images calibrate int8.")
@click.option("--edge/--no-edge", default=True, show_default=True, help="Also the random-weight edge model.")
@click.option("--edge-size", type=int, default=256, show_default=True, help="The edge model's image size.")
@click.option("--edge-grid", type=int, default=4, show_default=True, help="The edge model's grid.")
@click.option("--weights", "settings", default=",".join(SETTINGS), show_default=True, callback=weight_settings,
              help="The files to compare (fewer: a quicker run).")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--steps", type=int, default=4, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--patch-batch", type=int, default=1, show_default=True)
@click.option("--allocation", "allocations", type=click.Choice([*ALLOCATIONS, "all"]), default="patchgen",
              show_default=True, callback=lambda c, p, v: list(ALLOCATIONS) if v == "all" else [v],
              help="patchgen's memory-first session settings (--memory-budget min), onnxruntime's defaults (arena "
                   "and memory pattern on), the planner's choice under the default budget, or all three.")
@click.option("--models-dir", type=click.Path(path_type=Path), default=None,
              help="Keep the exported files here (for benchmarks/quality.py) [default: a temporary folder].")
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS / "precision", show_default=True)
def main(checkpoints, edge, edge_size, edge_grid, settings, rounds, steps, threads, patch_batch, allocations,
         models_dir, out):
    """File size, peak RSS and s/step of fp32, fp16 and int8 exports, timed interleaved."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = models_dir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        sources = [(c.parent.name if c.name == "checkpoint.pt" else c.stem, c, None) for c in checkpoints]
        if edge:
            stem = f"edge{edge_size}_{edge_grid}x{edge_grid}"
            model = random_model(Path(tmp) / f"{stem}.onnx", edge_size, edge_grid, keep_checkpoint=True)
            sources.append((f"{stem} (random weights)", model.with_suffix(".pt"), "emoji-faces"))
        files, sizes = export_all(sources, settings, folder)
        cells, times, peaks, plans = timed_rounds(files, allocations, rounds, steps, threads, patch_batch)
        rows = [precision_row(files, sizes, cell, times, peaks, plans) for cell in cells]
    notes = (f"{rounds} rounds, interleaved; each cell a fresh `patchgen-sample`-like process (1 image, {steps} DDIM "
             f"steps, patch batch {patch_batch} but the planner's own, {threads} threads), peak RSS from the kernel "
             f"(largest over rounds), "
             f"s/step the median; speed-up = fp32's s/step / this one's in the same round and allocation: "
             f"median (min-max). "
             f"Allocation: patchgen's session settings (arena off, malloc tuned: the budgetable peak) or "
             f"onnxruntime's defaults (arena and memory pattern on, malloc untuned) or the planner's choice under "
             f"the default budget (plan: allocation x patches per call). int8 is U8S8, int8-s8s8 S8S8. "
             f"Kernels: op counts in onnxruntime's optimised graph. CPU int8/bf16 flags: {cpu_flags()}.")
    columns = [("model", "model"), ("weights", "weights"), ("allocation", "allocation"), ("plan", "plan"),
               ("file_mb", "file MB"),
               ("size_vs_fp32", "size / fp32"),
               ("peak_mib", "peak RSS MiB"), ("s_per_step", "s/step"), ("speedup", "speed-up vs fp32"),
               ("speedup_min", "min"), ("speedup_max", "max"), ("kernels", "kernels")]
    write_results(out, "Weight precision: fp32, fp16 and int8 files of the same model", columns, rows, notes)
    click.echo(f"wrote {out}.md")


if __name__ == "__main__":
    main()
