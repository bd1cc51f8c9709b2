"""Shared benchmark plumbing: fresh processes measured by the kernel, random-weight models, result files."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from patchgen.runtime.environment import MALLOC_TUNING_ENV, SESSION_OPTIONS_ENV  # constants only
from patchgen.runtime.files import atomic_output  # small: os, re, tempfile (the benchmark parents stay small)

RESULTS = Path(__file__).parent / "results"


def machine() -> str:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{platform.machine()} {cpu or platform.processor()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def run_fresh(argv: list[str], env: dict | None = None, preexec=None) -> dict:
    """Run argv in a new process; its peak RSS is the kernel's ru_maxrss for that child (KiB on Linux).
    preexec: called in the child before exec (e.g. to join a memory cgroup).

    Linux carries the parent's high-water mark into a child's ru_maxrss across fork and exec, so the
    driver must stay far smaller than what it measures: it never imports numpy, torch or onnxruntime.
    """
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env={**os.environ, **(env or {})}, text=True,
                                preexec_fn=preexec)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        return {"returncode": proc.returncode, "peak_mib": usage.ru_maxrss / 1024, "wall_s": wall,
                "stdout": out.read(), "stderr": err.read()}


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


MAKE_MODEL = r"""
import json, sys
from pathlib import Path
from patchgen.export.onnx_export import export_onnx
from patchgen.models.checkpoint import save_checkpoint
from patchgen.models.config import ModelConfig, TrainConfig
from patchgen.models.data import DataSource
from patchgen.models.train import new_state, state_dict
path, config, keep, export = Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3] == "1", json.loads(sys.argv[4])
config["channel_mults"] = tuple(config.get("channel_mults", (1, 2, 2)))
config["attention_resolutions"] = tuple(config.get("attention_resolutions", (8,)))
cfg, train_config = ModelConfig(**config), TrainConfig()
ckpt = path.with_suffix(".pt")
save_checkpoint(ckpt, state_dict(new_state(cfg, train_config), cfg, train_config, DataSource("random weights")))
export_onnx(ckpt, path, force=True, **export)
if not keep:
    ckpt.unlink()
"""


def random_model(path: Path, image_size: int, grid: int, keep_checkpoint: bool = False, weights: str = "fp32",
                 calibration_data: str | None = None, **config) -> Path:
    """Export a random-weight patch model, in a child process (it needs torch; this process stays lean).
    With keep_checkpoint the checkpoint stays beside it as PATH.pt (for the PyTorch comparison); weights and
    calibration_data go to export_onnx (int8 needs calibration images: a folder)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        config = {"image_size": image_size, "grid": grid, "use_position": grid > 1, "use_gcc": grid > 1, **config}
        export = {"weights": weights, "calibration_data": calibration_data}
        subprocess.run(python("-c", MAKE_MODEL, str(path), json.dumps(config), str(int(keep_checkpoint)),
                              json.dumps(export)), check=True)
    return path


# One sampling process, patchgen's runtime: prints imports / floor / peak (MiB), seconds per step, the resident
# set at the end split into anonymous and file-backed pages (mapped weights), and how the graph was opened.
# argv: model, patch batch (0: the planner under the default budget, its choice reported), steps, threads. The
# onnxruntime and malloc settings come from the environment (`sample_run`).
SAMPLE_CHILD = r"""
import json, sys, time
from pathlib import Path
def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
model_path, patch_batch, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
import numpy as np, onnxruntime
from patchgen.runtime.model import load_model
from patchgen.runtime.generate import make_plan, iter_samples
imports = status("VmRSS")
t0 = time.perf_counter()
model = load_model(model_path, threads)
load_s = time.perf_counter() - t0
# The floor: resident after one call, which faults in weights that a cached graph maps (graph_cache.py).
from patchgen.runtime.spec import example_feeds
feeds = example_feeds(model.spec, np.zeros(1, np.int64), np.random.default_rng(0))
model(feeds["x"], feeds["t"], feeds.get("pos"), feeds.get("gcc"))
floor = status("VmRSS")
t0 = time.perf_counter()
plan = make_plan(model, 1, seed=0, steps=steps, patch_batch=patch_batch or None)  # 0: the planner, default budget
plan_s = time.perf_counter() - t0
t0 = time.perf_counter()
for _ in iter_samples(model, plan):
    pass
print(json.dumps({"imports_mib": imports, "floor_mib": floor, "peak_mib": status("VmHWM"), "load_s": load_s,
                  "s_per_step": (time.perf_counter() - t0) / steps, "anon_mib": status("RssAnon"),
                  "file_mib": status("RssFile"), "graph": model.graph, "plan_s": plan_s,
                  "patch_batch": plan.patch_batch, "allocation": plan.allocation, "threads": model.threads}))
"""


SAMPLE_CLI = ["-c", "from patchgen.cli.sample import main; main()"]
MIB = 2**20


def sample_cli(model: str, out: Path, *extra: str, num_images: int = 2, steps: int | None = 2,
               threads: int | None = 1, preexec=None) -> dict:
    """`patchgen-sample` in a fresh process (`run_fresh`), with what its --report says (cli/report.py; the
    lines on stderr are for people and are never read): the patch batch, allocation and threads it ran with,
    its predicted peak (MiB) and s/image (None where it has none), and whether --out was created. "report" is
    the whole record (None when the run wrote none, as when its options were refused). steps None: the
    sampler's default."""
    threading = ["--threads", str(threads)] if threads else []  # 0/None: the planner's (or the default) count
    stepping = ["--steps", str(steps)] if steps else []  # None: the sampler's default
    with tempfile.TemporaryDirectory(prefix="patchgen-bench-") as folder:
        report = Path(folder) / "report.json"
        # --force: a benchmark's runs take turns writing into the same scratch folder
        r = run_fresh(python(*SAMPLE_CLI, "--model", model, "-n", str(num_images), *stepping, *threading,
                             "--out", str(out), "--force", "--report", str(report), *extra),
                      preexec=preexec)
        record = json.loads(report.read_text()) if report.exists() else None
    plan = (record or {}).get("plan") or {}
    predicted = plan.get("predicted_peak_bytes")
    per_image = ((record or {}).get("seconds") or {}).get("per_image")
    return {**r, "report": record, "patch_batch": plan.get("patch_batch"), "allocation": plan.get("allocation"),
            "threads": plan.get("threads"), "predicted_mib": predicted / MIB if predicted else None,
            "s_per_image": per_image, "created_out": out.exists()}


EXPORT_CLI = ["-m", "patchgen.cli.export"]


def export_cli(checkpoint: Path, out: Path, *extra: str) -> dict:
    """`patchgen-export CHECKPOINT -o OUT --force` in a fresh process (`run_fresh`), with what its --report says
    (cli/report.py; the lines it prints are for people and are never read) as "report": the whole record, None
    when the export wrote none (as when its options were refused)."""
    with tempfile.TemporaryDirectory(prefix="patchgen-bench-") as folder:
        report = Path(folder) / "report.json"
        r = run_fresh(python(*EXPORT_CLI, str(checkpoint), "-o", str(out), "--force", "--report", str(report),
                             *extra))
        return {**r, "report": json.loads(report.read_text()) if report.exists() else None}


def refusal_minimum(run: dict) -> float | None:
    """The minimum budget (MiB) that a `sample_cli` run refused for too small a budget named, else None."""
    error = (run["report"] or {}).get("error") or {}
    minimum = error.get("minimum_budget_bytes")
    return None if run["returncode"] != 2 or minimum is None else minimum / MIB


def refused_minimum(model: str, out: Path, *extra: str, num_images: int = 2, steps: int = 2, threads: int = 1,
                    preexec=None) -> tuple[float | None, list[dict]]:
    """(the minimum budget (MiB) patchgen-sample names when refusing a 1 MiB budget, its refusals): a budget below
    the weights is refused while the model loads, with a bound from the weights alone (the report's error stage
    "loading"); that bound is then asked for, and the planner's refusal names the measured minimum. None when a
    run was not refused with a minimum (exit 2)."""
    budget, runs = "1M", []
    for _ in range(2):
        r = sample_cli(model, out, *extra, "--memory-budget", budget, num_images=num_images, steps=steps,
                       threads=threads, preexec=preexec)
        runs.append(r)
        minimum = refusal_minimum(r)
        if minimum is None:
            return None, runs
        if r["report"]["error"]["stage"] != "loading":
            return minimum, runs
        budget = f"{minimum}M"  # the bound holds a fresh run's weights (it carries a margin)
    return None, runs


def sample_run(model: Path, patch_batch: int, steps: int, threads: int, opts: dict | None = None,
               repeats: int = 1) -> dict:
    """SAMPLE_CHILD in fresh processes; memory from the kernel, time the fastest of `repeats`.
    opts: onnxruntime settings laid over patchgen's in every session (runtime/session.py, `apply_overrides`:
    SessionOptions attributes such as enable_mem_pattern, config entries such as session.disable_prepacking),
    and "malloc_tuning": False to leave glibc's allocator as it is. On failure the row holds the error instead."""
    settings = {k: v for k, v in (opts or {}).items() if k != "malloc_tuning"}
    env = {SESSION_OPTIONS_ENV: json.dumps(settings), **({} if (opts or {}).get("malloc_tuning", True)
                                                         else {MALLOC_TUNING_ENV: "0"})}
    best = None
    for _ in range(repeats):
        r = run_fresh(python("-c", SAMPLE_CHILD, str(model), str(patch_batch), str(steps), str(threads)), env=env)
        if r["returncode"] != 0:
            return {"error": (r["stderr"].strip().splitlines() or ["?"])[-1][:120], "kernel_peak_mib": r["peak_mib"]}
        row = {**json.loads(r["stdout"]), "kernel_peak_mib": r["peak_mib"]}
        best = row if best is None or row["s_per_step"] < best["s_per_step"] else best
    return best


def write_results(stem: Path, title: str, columns: list[tuple[str, str]], rows: list[dict], notes: str = "") -> None:
    """STEM.json (machine-readable) and STEM.md (a table), each written atomically; columns are (key, header)
    pairs."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(stem.with_suffix(".json"), "w") as f:
        f.write(json.dumps({"title": title, "machine": machine(), "rows": rows}, indent=1) + "\n")

    def cell(v):
        if v is None:
            return ""
        return f"{v:.3g}" if isinstance(v, float) and abs(v) < 100 else (f"{v:.0f}" if isinstance(v, float) else str(v))
    lines = [f"# {title}", "", f"Machine: {machine()}", "", "| " + " | ".join(h for _, h in columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(k, "")) for k, _ in columns) + " |" for r in rows]
    if notes:
        lines += ["", notes]
    with atomic_output(stem.with_suffix(".md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(path: Path, draw) -> None:
    """Save a figure drawn by draw(ax) as PNG, if matplotlib (the bench extra) is installed. Call it only after
    all measurements: importing matplotlib makes this process large, which later children would inherit."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib not installed (pip install 'patchgen[bench]'): no plot {path.name}")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    draw(ax)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_output(path.with_suffix(".png")) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
