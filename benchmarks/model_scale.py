"""Models of every size under the budget: file size, open time, peak RSS and speed, from the edge model to
the paper's U-Net, each opened three ways.

Models: random weights exported by patchgen-export's own code (a large model's weights go to external data),
for each width (32: multipliers 1-2-2, the edge model; 64 and 128: 1-2-4-8 with attention at 16, 128 being
the paper's network), image size and grid, fp32 and (with --int8) static int8 calibrated on generated images.
Each cell is one image, --steps DDIM steps, one patch per call, in a fresh process, three ways:

- before: onnxruntime's default optimisation (ORT_ENABLE_ALL) on the file itself, as patchgen opened every
  model before the graph cache: on x86 its layout pass holds a second copy of the Conv weights;
- cold:   patchgen with an empty graph cache: the open includes the one-off build of the optimised graph;
- cached: patchgen with the cache entry in place: the graph opens with optimisation off, its weights mapped.

Rounds interleave every cell and way (round 1 runs all of them, then round 2 ...); times are medians over the
rounds, peaks the largest. Peak RSS is the kernel's (VmHWM) and includes the mapped weights once they fault
in; anon/file split the resident set at the end of the run (RssAnon, RssFile). "weights" is the file size
(the .onnx and its external data). s/call is the sampling time per step over G*G.

    python benchmarks/model_scale.py --int8 4 --inline 1,4             # the table in results/model_scale.md
    python benchmarks/model_scale.py --widths 32 --sizes 128 --grids 1,4 --rounds 1     # a quick look

"fp32, one file" rows: the same weights as a single .onnx, the form patchgen-export wrote for every model
before (and still writes below onnx_file.EXTERNAL_DATA_FROM).
"""
from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import click

from benchlib import RESULTS, python, random_model, run_fresh, write_results
from memory_vs_grid import ATTENTION_LIMIT, attention_bytes, unfit

from patchgen.runtime.environment import CACHE_ENV
from patchgen.runtime.pretrained import pretrained_dir, resolve_model  # stdlib only: the parent stays lean

WIDTHS = {
    32: dict(base_width=32, channel_mults=(1, 2, 2), attention_resolutions=(8,)),
    64: dict(base_width=64, channel_mults=(1, 2, 4, 8), attention_resolutions=(16,)),
    128: dict(base_width=128, channel_mults=(1, 2, 4, 8), attention_resolutions=(16,)),  # the paper's
}
WAYS = ("before", "cold", "cached")

# One sampling process: prints what it measured as JSON. argv: model, way, steps, threads.
CHILD = r"""
import json, sys, time
from pathlib import Path
def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
model_path, way, steps, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
import patchgen.runtime.model as model_module
if way == "before":
    from patchgen.runtime.graph_cache import Opened
    from patchgen.runtime.session import open_session
    def direct(path, threads, provider, build_limit=None):
        return Opened(open_session(path, threads, provider, "all"), "-", "before")
    model_module.open_model_session = direct
from patchgen.runtime.generate import iter_samples, make_plan
imports = status("VmRSS")
t0 = time.perf_counter()
model = model_module.load_model(model_path, threads)
open_s = time.perf_counter() - t0
opened_peak = status("VmHWM")
plan = make_plan(model, 1, seed=0, steps=steps, patch_batch=1)
t0 = time.perf_counter()
for _ in iter_samples(model, plan):
    pass
print(json.dumps({"graph": model.graph, "imports_mib": imports, "open_s": open_s, "opened_peak_mib": opened_peak,
                  "peak_mib": status("VmHWM"), "anon_mib": status("RssAnon"), "file_mib": status("RssFile"),
                  "s_per_step": (time.perf_counter() - t0) / steps, "notes": list(model.notes)}))
"""


def calibration_folder(folder: Path, size: int, count: int = 24) -> Path:
    """Generated calibration images (coloured discs on white), made in a child process (numpy, Pillow)."""
    if not folder.is_dir():
        code = ("import sys, numpy as np; from PIL import Image; from pathlib import Path\n"
                "out, size, n = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]); out.mkdir(parents=True)\n"
                "rng = np.random.default_rng(0); yy, xx = np.mgrid[:size, :size]\n"
                "for k in range(n):\n"
                "    img = np.full((size, size, 3), 255, np.uint8); c = rng.uniform(0.3, 0.7, 2) * size\n"
                "    disc = (yy - c[0]) ** 2 + (xx - c[1]) ** 2 < (rng.uniform(0.2, 0.35) * size) ** 2\n"
                "    img[disc] = rng.integers(0, 200, 3)\n"
                "    Image.fromarray(img).save(out / f'{k:03d}.png')\n")
        r = run_fresh(python("-c", code, str(folder), str(size), str(count)))
        if r["returncode"]:
            raise click.ClickException(r["stderr"][-300:])
    return folder


def model_files(model: Path) -> list[Path]:
    return [p for p in model.parent.iterdir() if p.is_file() and p.name.startswith(model.name)]


def inline_copy(model: Path, to: Path) -> Path:
    """The same model as one file (its weights inside the .onnx), made in a child process (it needs onnx)."""
    if not to.exists():
        to.parent.mkdir(parents=True, exist_ok=True)
        r = run_fresh(python("-c", "import onnx, sys; onnx.save(onnx.load(sys.argv[1]), sys.argv[2])", str(model),
                             str(to)))
        if r["returncode"]:
            raise click.ClickException(r["stderr"][-300:])
    return to


def measure(model: Path, way: str, cache: Path, steps: int, threads: int) -> dict:
    if way == "cold":
        shutil.rmtree(cache, ignore_errors=True)
    r = run_fresh(python("-c", CHILD, str(model), way, str(steps), str(threads)), env={CACHE_ENV: str(cache)})
    if r["returncode"] != 0:
        return {"error": (r["stderr"].strip().splitlines() or ["?"])[-1][:160]}
    return {**json.loads(r["stdout"]), "kernel_peak_mib": r["peak_mib"]}


def summarise(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[-1]["error"]}
    return {"open_s": statistics.median(r["open_s"] for r in ok), "peak_mib": max(r["kernel_peak_mib"] for r in ok),
            "anon_mib": statistics.median(r["anon_mib"] for r in ok),
            "file_mib": statistics.median(r["file_mib"] for r in ok),
            "s_per_step": statistics.median(r["s_per_step"] for r in ok), "graph": ok[-1]["graph"],
            "runs": len(ok), "notes": sorted({n for r in ok for n in r["notes"]})}


def make_cells(models, widths: str, sizes: str, grids: str, int8_grids: str, inline_grids: str,
               work: Path) -> list[dict]:
    """The models to measure, exported (or found) first: one dict per cell."""
    int8_cells = [tuple(map(int, g.split("/"))) if "/" in g else (None, int(g)) for g in int8_grids.split(",") if g]
    inline = {int(g) for g in inline_grids.split(",") if g}
    cells = []
    for given in models:
        path = resolve_model(given)
        cells.append({"name": path.stem, "width": path.stem, "size": "-", "grid": 1, "weights": "as shipped"
                      if path.parent == pretrained_dir() else "as given", "model": path,
                      "cache": work / path.stem / "cache"})
    widths = [int(w) for w in widths.split(",") if w]
    sizes, grids = [int(s) for s in sizes.split(",")], [int(g) for g in grids.split(",")]
    why = unfit([(size, grid, len(WIDTHS[width]["channel_mults"]), 0) for width in widths for size in sizes
                 for grid in grids])
    for width in widths:
        config = WIDTHS[width]
        levels = len(config["channel_mults"])
        for size in sizes:
            for grid in grids:
                if why[size, grid, levels, 0] or attention_bytes(size, grid, levels) > ATTENTION_LIMIT:
                    continue
                int8 = (size, grid) in int8_cells or (None, grid) in int8_cells
                for weights in ("fp32", "int8") if int8 else ("fp32",):
                    name = f"w{width}_{size}_{grid}x{grid}_{weights}"
                    extra = {} if weights == "fp32" else {
                        "weights": "int8",
                        "calibration_data": str(calibration_folder(work / f"calibration{size}", size))}
                    click.echo(f"model {name} ...")
                    model = random_model(work / name / "model.onnx", size, grid, **config, **extra)
                    cells.append({"name": name, "width": width, "size": size, "grid": grid, "weights": weights,
                                  "model": model, "cache": work / name / "cache"})
                    if weights == "fp32" and grid in inline and len(model_files(model)) > 1:
                        single = inline_copy(model, work / f"{name}_one_file" / "model.onnx")
                        cells.append({**cells[-1], "name": f"{name}_one_file", "weights": "fp32, one file",
                                      "model": single, "cache": single.parent / "cache"})
    return cells


def run_rounds(cells: list[dict], rounds: int, steps: int, threads: int) -> dict:
    """(cell name, way) -> its runs: round 1 runs every cell every way, then round 2 ..."""
    runs = {(c["name"], way): [] for c in cells for way in WAYS}
    for k in range(rounds):
        for c in cells:
            for way in WAYS:
                r = measure(c["model"], way, c["cache"], steps, threads)
                runs[c["name"], way].append(r)
                click.echo(f"round {k + 1} {c['name']} {way}: " + (r.get("error") or
                           f"open {r['open_s']:.2f} s, peak {r['kernel_peak_mib']:.0f} MiB (anon {r['anon_mib']:.0f}, "
                           f"file {r['file_mib']:.0f}), {r['s_per_step']:.3f} s/step, graph {r['graph']}"))
    return runs


def table(cells: list[dict], runs: dict) -> list[dict]:
    """One row per cell: each way's summary, and the ratios (to the weights, to 'before', to the 1x1)."""
    rows = []
    for c in cells:
        files = model_files(c["model"])
        weights_mib = sum(p.stat().st_size for p in files) / 2**20
        got = {way: summarise(runs[c["name"], way]) for way in WAYS}
        named = isinstance(c["width"], str)  # a model given by name or path: its own size and grid
        row = {"model": c["width"] if named else f"w{c['width']}", "size": c["size"],
               "grid": "-" if named else f"{c['grid']}x{c['grid']}", "weights": c["weights"],
               "file_mib": weights_mib, "external": len(files) > 1}
        for way, s in got.items():
            row[f"{way}_open_s"] = s.get("open_s")
            row[f"{way}_peak_mib"] = s.get("peak_mib")
            row[f"{way}_s_per_step"] = s.get("s_per_step")
            row[f"{way}_s_per_call"] = s["s_per_step"] / c["grid"] ** 2 if "s_per_step" in s and not named else None
            row[f"{way}_error"] = s.get("error", "")
        cached = got["cached"]
        if "peak_mib" in cached:
            row.update(anon_mib=cached["anon_mib"], file_backed_mib=cached["file_mib"],
                       peak_over_weights=cached["peak_mib"] / weights_mib)
            if row["before_peak_mib"]:
                row["cached_over_before"] = cached["peak_mib"] / row["before_peak_mib"]
            if row["before_s_per_step"]:
                row["call_vs_before"] = row["cached_s_per_step"] / row["before_s_per_step"]
        rows.append(row)
    for row in rows:  # the peak against the 1x1 of the same width, size and precision, both cached
        def full_of(weights):
            return next((r for r in rows if (r["model"], r["size"], r["weights"], r["grid"]) ==
                         (row["model"], row["size"], weights, "1x1")), None)
        full = full_of(row["weights"]) or (full_of("fp32") if row["weights"] == "fp32, one file" else None)
        if full and full.get("cached_peak_mib") and row.get("cached_peak_mib"):
            row["peak_over_1x1"] = row["cached_peak_mib"] / full["cached_peak_mib"]
        if full and full.get("before_peak_mib") and row.get("before_peak_mib"):
            row["before_over_1x1"] = row["before_peak_mib"] / full["before_peak_mib"]
    return rows


@click.command(epilog="Example: python benchmarks/model_scale.py --widths 32,64 --sizes 128 --rounds 2")
@click.option("--model", "models", multiple=True, help="Also an exported model, or a shipped one by name (repeatable).")
@click.option("--widths", default="32,64,128", show_default=True, help="Random-weight models' widths; '' for none.")
@click.option("--sizes", default="128,256", show_default=True)
@click.option("--grids", default="1,2,4,8", show_default=True)
@click.option("--int8", "int8_grids", default="",
              help="Grids that also get an int8 export, GRID or SIZE/GRID (e.g. 4 or 128/4,256/8); none by default.")
@click.option("--inline", "inline_grids", default="", help="Grids whose external-data fp32 models are also measured "
              "as one file, the form patchgen-export wrote before (e.g. 1,4).")
@click.option("--rounds", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/model_scale"),
              show_default=True, help="Models and their graph caches (kept for reruns; several GB at width 128).")
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS / "model_scale", show_default=True)
def main(models, widths, sizes, grids, int8_grids, inline_grids, rounds, steps, threads, work, out):
    """Open time, peak RSS (anonymous and file-backed) and s/call per model size, grid and way of opening."""
    cells = make_cells(models, widths, sizes, grids, int8_grids, inline_grids, work)
    rows = table(cells, run_rounds(cells, rounds, steps, threads))
    notes = (f"Each cell: one image, {steps} DDIM steps, 1 patch per call, {threads} threads, a fresh process per "
             f"run, {rounds} interleaved rounds (times: median; peaks: largest). before = onnxruntime's default "
             "optimisation on the file itself (patchgen before the graph cache); cold = an empty graph cache, the "
             "open builds the optimised graph; cached = the entry in place, weights memory-mapped. The page cache "
             "is warm in every way (the file was just written or read). anon / file: RssAnon / RssFile at the end "
             "of a cached run. Random weights; int8: static QDQ calibrated on generated images.")
    write_results(out, "Model scale: open time, peak RSS and speed by model size, grid and way of opening",
                  [("model", "width"), ("size", "image"), ("grid", "grid"), ("weights", "weights"),
                   ("file_mib", "file MiB"), ("external", "external data"),
                   ("before_open_s", "open s (before)"), ("cold_open_s", "open s (cold)"),
                   ("cached_open_s", "open s (cached)"), ("before_peak_mib", "peak MiB (before)"),
                   ("cold_peak_mib", "peak MiB (cold)"), ("cached_peak_mib", "peak MiB (cached)"),
                   ("anon_mib", "anon MiB"), ("file_backed_mib", "file MiB (RSS)"),
                   ("peak_over_weights", "peak / weights"), ("cached_over_before", "peak / before's"),
                   ("peak_over_1x1", "peak / 1x1 (cached)"), ("before_over_1x1", "peak / 1x1 (before)"),
                   ("before_s_per_call", "s/call (before)"), ("cached_s_per_call", "s/call (cached)"),
                   ("call_vs_before", "call time / before's"), ("cached_error", "note")], rows, notes)
    click.echo(f"wrote {out}.md")


if __name__ == "__main__":
    main()
