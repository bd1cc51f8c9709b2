"""Budgets under a hard memory limit: `patchgen-sample --memory-budget B` inside a memory cgroup whose limit is B.

A small board or a container does not warn: past its limit the kernel reclaims, then OOM-kills. Per model,
the minimum budget is read from a refusal (1 MiB), then each budget (the minimum, +2 MiB, +8 MiB, and up
to the peak of all patches in one call) runs in a fresh cgroup with memory.limit_in_bytes = B (cgroup
v1; memory.max and memory.swap.max = 0 on v2). Reported: the budget, the patch batch chosen, the kernel's
peak RSS of the process, the cgroup's own peak (it counts page cache too), the exit code, and whether the
kernel OOM-killed anything. The allocation (memory-first or onnxruntime's arena) is the planner's choice
for each budget, so both are in play. Needs root and a memory controller (Linux); elsewhere it says why and stops.

    python benchmarks/hard_limit.py --model faces64_2x2 --random 128/2/32 --random 256/4/32
    python benchmarks/hard_limit.py --model faces64_2x2 --random 256/4/32/8 --random 256/4/32/8/int8 \
        --out benchmarks/results/hard_limit_arena
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import click

from benchlib import RESULTS, random_model, refused_minimum, sample_cli, write_results

CGROUP = Path("/sys/fs/cgroup")
MIB = 2**20


class Cgroup:
    """A fresh memory cgroup with a hard limit (v2 if the unified hierarchy is mounted, else v1)."""

    def __init__(self, name: str, limit: int):
        self.v2 = (CGROUP / "cgroup.controllers").is_file()
        self.path = (CGROUP if self.v2 else CGROUP / "memory") / name
        self.path.mkdir()
        if self.v2:
            (self.path / "memory.max").write_text(str(limit))
            if (self.path / "memory.swap.max").exists():
                (self.path / "memory.swap.max").write_text("0")
        else:
            (self.path / "memory.limit_in_bytes").write_text(str(limit))
            if (self.path / "memory.memsw.limit_in_bytes").exists():  # no swapping around the limit either
                (self.path / "memory.memsw.limit_in_bytes").write_text(str(limit))
            (self.path / "memory.swappiness").write_text("0")

    def enter(self) -> None:  # in the child, before exec
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self) -> int:
        return int((self.path / ("memory.peak" if self.v2 else "memory.max_usage_in_bytes")).read_text())

    def oom_kills(self) -> int:
        text = (self.path / ("memory.events" if self.v2 else "memory.oom_control")).read_text()
        m = re.search(r"oom_kill (\d+)", text)
        return int(m.group(1)) if m else 0

    def remove(self) -> None:
        self.path.rmdir()


def why_not() -> str:
    if os.name != "posix" or not CGROUP.is_dir():
        return "needs Linux with /sys/fs/cgroup"
    if os.geteuid() != 0:
        return "needs root to create memory cgroups"
    controller = CGROUP if (CGROUP / "cgroup.controllers").is_file() else CGROUP / "memory"
    if not controller.is_dir():
        return "no memory controller mounted"
    if not os.access(controller, os.W_OK):
        return f"{controller} is not writable (a read-only cgroup mount, as in most containers)"
    if not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        return "/proc/sys/vm/drop_caches is not writable"
    return ""


def drop_page_cache() -> None:
    """Page cache is charged to the cgroup that first read it: without this, the libraries and the model file
    that earlier runs cached would not count against the limit, as they would on a board with nothing else."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("1")


def sample(model: str, out: Path, extra: list[str], steps: int, group: Cgroup | None = None) -> dict:
    return sample_cli(model, out, *extra, steps=steps, preexec=group.enter if group else None)


def measure(model: str, tmp: Path, steps: int, points: int) -> list[dict]:
    name = Path(model).name
    sample(model, tmp / "warm", ["--patch-batch", "1"], steps)  # builds the graph cache, as a first run does
    low, refusals = refused_minimum(model, tmp / "refused", steps=steps)
    if low is None:
        raise click.ClickException(f"expected 1M to be refused with a minimum: {refusals[-1]['stderr'][-300:]}")
    top = sample(model, tmp / "all", ["--patch-batch", "1000000"], steps)["peak_mib"] * 1.1
    budgets = [low, low + 2, low + 8] + [low + 8 + (top - low - 8) * k / (points - 3) for k in range(1, points - 2)]
    rows = []
    for k, budget in enumerate(b for b in budgets if b <= max(top, low + 8)):
        group = Cgroup(f"patchgen-hard-limit-{os.getpid()}-{k}", int(budget * MIB))
        try:
            drop_page_cache()
            r = sample(model, tmp / f"s{k}", ["--memory-budget", f"{budget:.1f}M"], steps, group)
            cg_peak, kills = group.peak() / MIB, group.oom_kills()
        finally:
            group.remove()
        killed = r["returncode"] in (-9, 137) or kills > 0
        note = r["stderr"].strip().splitlines()[-1][:110] if r["returncode"] else ""
        rows.append({"model": name, "budget_mib": round(budget, 1), "allocation": r["allocation"] or "-",
                     "patch_batch": r["patch_batch"] or "-",
                     "peak_mib": r["peak_mib"], "cgroup_peak_mib": cg_peak, "exit": r["returncode"],
                     "oom_killed": "YES" if killed else "no", "note": note})
        click.echo(f"{name} limit = budget {budget:.1f} MiB: {r['allocation']} x{r['patch_batch']}, "
                   f"peak RSS {r['peak_mib']:.1f}, "
                   f"cgroup peak {cg_peak:.1f} MiB, exit {r['returncode']}, OOM-killed {'YES' if killed else 'no'}"
                   + (f" ({note})" if note else ""))
    return rows


@click.command(epilog="Example: python benchmarks/hard_limit.py --model faces64_2x2 --random 128/2/32 "
                      "--random 256/4/32")
@click.option("--model", "models", multiple=True, help="An exported model or a shipped model's name (repeatable).")
@click.option("--random", "randoms", multiple=True,
              help="A random-weight model made here, SIZE/GRID/BASE_WIDTH[/HALO[/int8]] (repeatable; int8: "
                   "calibrated on emoji-faces).")
@click.option("--steps", type=int, default=2, show_default=True)
@click.option("--points", type=click.IntRange(min=3), default=6, show_default=True,
              help="Budgets per model: the minimum, +2 MiB, +8 MiB, then evenly up to the peak of all patches in one "
                   "call (3: a smoke run).")
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS / "hard_limit", show_default=True)
def main(models, randoms, steps, points, out):
    """Run each budget inside a memory cgroup whose hard limit is that budget; count OOM kills."""
    reason = why_not()
    if reason:
        raise click.ClickException(reason)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        chosen = list(models)
        for spec in randoms:  # SIZE/GRID/BASE_WIDTH[/HALO[/int8]]
            parts = spec.split("/")
            size, grid, width, halo = (int(v) for v in (parts + ["0"])[:4])
            weights = parts[4] if len(parts) > 4 else "fp32"
            chosen.append(str(random_model(tmp / f"random_{size}_{grid}x{grid}_w{width}_h{halo}_{weights}.onnx", size,
                                           grid, base_width=width, halo=halo, weights=weights,
                                           calibration_data="emoji-faces" if weights == "int8" else None)))
        for model in chosen or ["faces64_2x2"]:
            rows += measure(model, tmp, steps, points)
    kills = sum(r["oom_killed"] == "YES" for r in rows)
    limit = ("v2 memory.max" if (CGROUP / "cgroup.controllers").is_file()
             else "v1 memory.limit_in_bytes, swap off")
    notes = (f"Each row: a fresh `patchgen-sample -n 2 --steps {steps} --threads 1 --memory-budget B` inside a new "
             f"memory cgroup with hard limit B ({limit}). "
             f"The page cache is dropped before each run, so that the libraries and the model file are charged to "
             f"the run's cgroup as they are read. One unbudgeted run per model first builds its graph cache "
             f"(runtime/graph_cache.py), as any first run does. Peak RSS: the kernel's ru_maxrss of the process; "
             f"cgroup peak: the "
             f"cgroup's high-water mark, page cache included (pages still mapped by other processes stay charged "
             f"to them). OOM kills in all: {kills} of {len(rows)} runs.")
    write_results(out, "Budgets under a hard memory limit (cgroup limit = budget)",
                  [("model", "model"), ("budget_mib", "budget = limit (MiB)"), ("allocation", "allocation"),
                   ("patch_batch", "patch batch"),
                   ("peak_mib", "peak RSS (MiB)"), ("cgroup_peak_mib", "cgroup peak (MiB)"), ("exit", "exit"),
                   ("oom_killed", "OOM-killed"), ("note", "note")], rows, notes)
    click.echo(f"{kills} OOM kill(s) in {len(rows)} runs; wrote {out}.md")


if __name__ == "__main__":
    main()
