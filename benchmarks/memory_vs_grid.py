"""Peak RSS against the grid: the same U-Net width exported for G = 1 (full image), 2, 4, 8.

For each image size and grid, one image sampled with a few DDIM steps in a fresh process, one patch per
onnxruntime call (patchgen) and all G*G patches in one call (the official code's way). Two model sizes:
the edge model (base width 32, multipliers 1-2-2, ~7 MB) and the paper's (width 128, 1-2-4-8).

    python benchmarks/memory_vs_grid.py                        # edge model at 128, 256, 512; paper at 128
    python benchmarks/memory_vs_grid.py --sizes 128 --grids 1,2 --no-paper --steps 1
    python benchmarks/memory_vs_grid.py --sizes 256 --grids 1,4 --halos 0,8 --no-paper   # with a halo of 8 px
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click

from benchlib import RESULTS, plot, python, random_model, run_fresh, sample_run, write_results

MODELS = {
    "edge": dict(base_width=32, channel_mults=(1, 2, 2), attention_resolutions=(8,)),
    "paper": dict(base_width=128, channel_mults=(1, 2, 4, 8), attention_resolutions=(16,)),
}


ATTENTION_LIMIT = 8 * 2**30  # bytes; beyond this the export's own torch check would exhaust a 24 GiB machine


# Why a random model of each (size, grid, levels, halo) cannot be made ("" when it can), by the library's own
# rules (runtime/spec.py: spec_problems cuts the image into G x G patches, fit_problems takes the (P+2M)^2
# window through the levels). A child process: runtime.spec imports numpy, and the driver stays small
# (benchlib.run_fresh). Patch models have position and GCC conditioning, a 1x1 has neither (random_model).
FIT_CHILD = r"""
import json, sys
from patchgen.runtime.spec import fit_problems, spec_problems
why = []
for size, grid, levels, halo in json.loads(sys.argv[1]):
    patch = grid > 1
    problems = spec_problems(size, 3, grid, patch, patch, halo=halo) or fit_problems(
        size // grid, grid, halo, levels, patch, patch, global_context=0, edge_mask=False)
    why.append(problems.message())
print(json.dumps(why))
"""


def unfit(cells: list[tuple[int, int, int, int]]) -> dict[tuple[int, int, int, int], str]:
    """(size, grid, levels, halo) -> why a random model of it cannot be made, "" when it can (FIT_CHILD)."""
    r = run_fresh(python("-c", FIT_CHILD, json.dumps(cells)))
    if r["returncode"]:
        raise click.ClickException(r["stderr"][-2000:])
    return dict(zip(cells, json.loads(r["stdout"])))


def attention_bytes(size: int, grid: int, levels: int, heads: int = 4, halo: int = 0) -> int:
    """Bytes of one mid-block attention matrix at batch 3 (the exporter's parity check): heads x N^2 floats."""
    tokens = ((size // grid + 2 * halo) // 2 ** (levels - 1)) ** 2
    return 3 * heads * tokens**2 * 4


def plot_peaks(out: Path, rows: list[dict]) -> None:
    """Peak RSS against G, one line per (model, size, patches per call, halo)."""
    def draw(ax):
        def key(r):  # one line per model, size, calls and halo; the 1x1 point (no halo) starts every line
            return r["model"], r["size"], r["per_call"] == 1

        series = sorted({(*key(r), r.get("halo", 0)) for r in rows})
        for name, size, one, halo in series:
            pts = [(int(r["grid"].split("x")[0]), r["peak_mib"]) for r in rows if r.get("peak_mib")
                   and key(r) == (name, size, one) and (r["grid"] == "1x1" or r.get("halo", 0) == halo)]
            if pts:
                ax.plot(*zip(*pts), "-o" if one else "--x",
                        label=f"{name} {size}px, {'1 patch' if one else 'all patches'}/call"
                              + (f", halo {halo}" if halo else ""))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("grid G (G x G patches)")
        ax.set_ylabel("peak RSS (MiB)")
        ax.legend(fontsize=7)
    plot(out, draw)


@click.command(epilog="Example: python benchmarks/memory_vs_grid.py --sizes 128,256 --steps 2")
@click.option("--sizes", default="128,256,512", show_default=True, help="Image sizes for the edge model.")
@click.option("--grids", default="1,2,4,8", show_default=True)
@click.option("--paper/--no-paper", default=True, show_default=True, help="Also the paper-size model at --paper-size.")
@click.option("--paper-size", type=int, default=128, show_default=True)
@click.option("--steps", type=int, default=2, show_default=True)
@click.option("--halos", default="0", show_default=True,
              help="Halos (px) for the patch models (G > 1); each is its own model and row.")
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS / "memory_vs_grid", show_default=True)
@click.option("--plot-only", is_flag=True, help="Only redraw the plot from OUT.json.")
def main(sizes, grids, paper, paper_size, steps, halos, threads, out, plot_only):
    """Peak RSS, floor, weights and time per step for each (model, size, grid, patches per call)."""
    if plot_only:
        plot_peaks(out, json.loads(out.with_suffix(".json").read_text())["rows"])
        return
    grids = [int(g) for g in grids.split(",")]
    halo_list = [int(m) for m in halos.split(",")]
    plan = [("edge", int(s)) for s in sizes.split(",")] + ([("paper", paper_size)] if paper else [])
    pairs = [(g, m) for g in grids for m in ([0] if g == 1 else halo_list)]
    why = unfit([(size, grid, len(MODELS[name]["channel_mults"]), halo) for name, size in plan for grid, halo in pairs])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, size in plan:
            config = MODELS[name]
            full_peak = None
            for grid, halo in pairs:
                problem = why[size, grid, len(config["channel_mults"]), halo]
                if problem:
                    click.echo(f"{name} {size} {grid}x{grid} halo {halo}: skipped, {problem}")
                    continue
                need = attention_bytes(size, grid, len(config["channel_mults"]), halo=halo)
                if need > ATTENTION_LIMIT:
                    rows.append({"model": name, "size": size, "grid": f"{grid}x{grid}", "halo": halo, "per_call": 1,
                                 "error": f"does not fit: mid-block attention alone needs {need / 2**30:.0f} GiB"})
                    click.echo(f"{name} {size} {grid}x{grid}: {rows[-1]['error']}")
                    continue
                model = random_model(Path(tmp) / f"{name}_{size}_{grid}_{halo}.onnx", size, grid, halo=halo, **config)
                for per_call in sorted({1, grid * grid}):
                    r = sample_run(model, per_call, steps, threads)
                    row = {"model": name, "size": size, "grid": f"{grid}x{grid}", "halo": halo, "per_call": per_call,
                           "file_mib": model.stat().st_size / 2**20, "floor_mib": r.get("floor_mib"),
                           "peak_mib": r["kernel_peak_mib"] if "error" not in r else None,
                           "s_per_step": r.get("s_per_step"), "error": r.get("error", "")}
                    if grid == 1:
                        full_peak = row["peak_mib"]
                    if row["peak_mib"] and full_peak:
                        row["vs_full"] = row["peak_mib"] / full_peak
                    if row["peak_mib"] and row["floor_mib"]:
                        row["peak_over_floor"] = row["peak_mib"] / row["floor_mib"]
                    rows.append(row)
                    click.echo(f"{name} {size} {grid}x{grid} halo {halo} x{per_call}/call: peak {row['peak_mib']} "
                               f"MiB, floor {row['floor_mib']}, {row['s_per_step']} s/step {row['error']}")
                model.unlink()
    write_results(out, f"Peak RSS vs grid ({steps} DDIM steps, {threads} threads, random weights)",
                  [("model", "model"), ("size", "image"), ("grid", "grid"), ("halo", "halo"),
                   ("per_call", "patches/call"),
                   ("file_mib", "ONNX MiB"), ("floor_mib", "floor MiB"), ("peak_mib", "peak MiB"),
                   ("vs_full", "peak / 1x1 peak"), ("peak_over_floor", "peak / floor"), ("s_per_step", "s/step"),
                   ("error", "note")], rows,
                  "Each row is a fresh process; peak is the kernel's ru_maxrss, floor is VmRSS after the session "
                  "opens and one call has faulted in its (mapped) weights. patches/call = G*G is the official "
                  "code's way (all patches in one batch).")

    plot_peaks(out, rows)


if __name__ == "__main__":
    main()
