"""--memory-budget is a promise about the kernel's peak RSS of the whole run: calibration never overshoots it, the
minimum a refusal names is a budget that then holds, and a run given any budget at or above it stays within it."""
import math
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

import patchgen.runtime.generate as generate
import patchgen.runtime.memory as memory
from patchgen.export.onnx_export import export_onnx
from patchgen.runtime.errors import PatchgenError
from patchgen.runtime.generate import make_plan
from patchgen.runtime.memory import (MIB, calibrate, calibrate_arena, fastest_fit, parse_size, plan_patch_batch,
                                     Calibration)
from patchgen.runtime.spec import ModelSpec

from conftest import blob_folder, sample_peak, tiny_config, write_checkpoint

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")


class FakeProcess:
    """The resident memory the planner reads, simulated (MiB): it rests at `rss`; loading peaked at `hwm`; a
    call of b patches adds per_patch * b for its duration, less the `heap` that free heap serves; the warm-up
    step adds a one-patch call plus an image and leaves `leftover` resident."""

    def __init__(self, rss, hwm, per_patch, heap=0.0, image=0.5, leftover=3.0):
        self.rss, self.hwm, self.per_patch, self.heap = rss, hwm, per_patch, heap
        self.image, self.leftover = image, leftover

    def added(self, b: int) -> float:
        return max(self.per_patch * b - self.heap, 0.0)

    def call(self, b: int) -> None:
        self.hwm = max(self.hwm, self.rss + self.added(b))

    def warm_up(self) -> None:
        self.hwm = max(self.hwm, self.rss + self.added(1) + self.image)
        self.rss += self.leftover

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(memory, "current_rss", lambda: int(self.rss * MIB))
        monkeypatch.setattr(memory, "peak_rss", lambda: int(self.hwm * MIB))


PROCESSES = {  # (rss, hwm after loading, per_patch) in MiB
    "hidden under the load peak": dict(rss=100, hwm=125, per_patch=0.3),
    "activations dominate": dict(rss=70, hwm=72, per_patch=130),
    "small calls served from free heap": dict(rss=80, hwm=82, per_patch=2, heap=1.5),
}


@pytest.mark.parametrize("kind", PROCESSES)
def test_calibration_and_plan_keep_every_budget(kind, monkeypatch):
    """Over a range of budgets: calibration never lifts the high-water mark above an accepted budget, the plan
    charges at least what its calls add, and the minimum a refusal names is accepted by a fresh process."""
    batches = list(range(1, 65))

    def extra(b: int) -> int:  # 4 MiB + 0.5 MiB per image in flight, 16 patches an image
        return 4 * MIB + int(((b - 1) // 16 + 1) * 0.5 * MIB)

    def plan(budget: float):
        fake = FakeProcess(**PROCESSES[kind])
        fake.install(monkeypatch)
        model = calibrate(fake.warm_up, fake.call, int(budget * MIB), batches, extra)
        return fake, model, plan_patch_batch(model, int(budget * MIB), batches, extra)

    accepted = 0
    for budget in [50 * 1.15**k for k in range(40)]:
        try:
            fake, model, pb = plan(budget)
        except PatchgenError as e:
            minimum = float(re.search(r"minimum of ([\d.]+)M", str(e)).group(1))
            assert minimum > budget
            plan(minimum)  # a fresh process accepts the minimum it was told
            continue
        accepted += 1
        assert fake.hwm <= budget, (budget, model)  # no probe overshot
        assert model.call_bytes(pb) >= fake.added(pb) * MIB  # charged at least what a call adds, hidden or not
        sampling = max(fake.hwm, fake.rss + fake.added(pb) + extra(pb) / MIB)
        assert sampling <= model.peak(pb, extra(pb)) / MIB <= budget
    assert accepted > 10


@pytest.mark.quick
def test_capped_budget_plans_one_patch_when_only_one_fits(monkeypatch):
    """A budget capped to what the process can have (here a cgroup limit of 300 MiB) is planned for: one patch
    per call, no two-patch probe run, and a refusal under the cap says both."""
    spec = ModelSpec(image_size=16, channels=3, grid=2, use_position=True, use_gcc=True)
    model = types.SimpleNamespace(spec=spec, weights_bytes=0, resident_before=0, provider="cpu", threads=1,
                                  threads_chosen=True, reopen=lambda *a, **k: None)  # probes simulated below
    fake = FakeProcess(rss=70, hwm=72, per_patch=130)
    fake.install(monkeypatch)
    monkeypatch.setattr(generate, "probe", lambda model, request: (fake.warm_up, fake.call))
    monkeypatch.setattr(memory, "available_memory", lambda rss: (300 * MIB, "the cgroup memory limit"))
    plan = make_plan(model, 4, memory_budget="4G")
    assert plan.budget == 300 * MIB and "planning for 300.0M" in plan.notes[0]
    assert plan.patch_batch == 1 and plan.images_per_run == 1
    assert fake.hwm <= 300 and plan.predicted_peak <= 300 * MIB

    fake = FakeProcess(rss=70, hwm=72, per_patch=130)
    fake.install(monkeypatch)
    monkeypatch.setattr(memory, "available_memory", lambda rss: (150 * MIB, "the cgroup memory limit"))
    with pytest.raises(PatchgenError, match=r"needs a memory budget of at least [\d.]+M \(one patch per call\), "
                                            r"but this process can have only 150\.0M \(the cgroup memory limit\): "
                                            r"free memory or raise the memory limit"):
        make_plan(model, 4, memory_budget="4G")


class FakeArena:
    """A process with an arena session just opened (MiB, seconds): the first call faults in `weights` of file
    pages; a call of b patches needs per_patch * b * frag of arena blocks, which stay, and `io` per patch
    beside them for its duration; it takes 0.01 + 0.004 * b seconds on a fake clock."""

    def __init__(self, rss, hwm, per_patch, weights, io=0.2, frag=1.15):
        self.rss, self.hwm, self.file, self.per_patch, self.weights = rss, hwm, 0.0, per_patch, weights
        self.io, self.frag, self.arena, self.clock = io, frag, 0.0, 0.0

    def call(self, b: int) -> None:
        if self.weights:
            self.rss, self.file, self.weights = self.rss + self.weights, self.file + self.weights, 0.0
        need = self.per_patch * b * self.frag
        self.rss, self.arena = self.rss + max(need - self.arena, 0.0), max(need, self.arena)
        self.hwm = max(self.hwm, self.rss + self.io * b)
        self.clock += 0.01 + 0.004 * b

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(memory, "current_rss", lambda: int(self.rss * MIB))
        monkeypatch.setattr(memory, "peak_rss", lambda: int(self.hwm * MIB))
        monkeypatch.setattr(memory, "file_rss", lambda: int(self.file * MIB))
        monkeypatch.setattr(memory.time, "perf_counter", lambda: self.clock)


@pytest.mark.parametrize("weights", [5.0, 300.0])
def test_arena_calibration_keeps_every_budget(weights, monkeypatch):
    """The arena keeps each call's blocks: over a range of budgets its probes never lift the mark above the
    budget, and the plan's predicted peak covers sampling with the chosen batch."""
    batches = [1, 2, 3, 4, *range(8, 65, 4)]

    def extra(b: int) -> int:
        return 4 * MIB + ((b - 1) // 4 + 1) * MIB // 2

    planned = 0
    for budget in [80 * 1.1**k for k in range(50)]:
        fake = FakeArena(rss=70, hwm=75, per_patch=3.0, weights=weights)
        first = 70 + weights + 3.0 * 1.15 + 0.2 + extra(1) / MIB  # what make_plan charges before the first probe
        if first > budget:
            continue
        fake.install(monkeypatch)
        model = calibrate_arena(fake.call, int(budget * MIB), batches, extra)
        assert fake.hwm <= budget, (budget, model)
        pb = fastest_fit(model, int(budget * MIB), extra)
        if not pb:
            continue
        planned += 1
        fake.call(pb)
        assert max(fake.hwm, fake.rss + extra(pb) / MIB) <= model.peak(pb, extra(pb)) / MIB <= budget
        assert pb == model.calls[-1][0] or model.peak(model.calls[-1][0], extra(model.calls[-1][0])) > budget * MIB \
            or model.seconds_per_patch(pb) <= 1.03 * model.seconds_per_patch(model.calls[-1][0])
    assert planned > 10
    assert model.largest == 64  # the largest budgets probe every doubling: each one gains speed here


@pytest.mark.quick
def test_fastest_fit_prefers_speed_then_less_memory():
    model = Calibration(reached=90 * MIB, floor=90 * MIB, calls=((1, MIB), (2, 2 * MIB), (4, 4 * MIB), (8, 8 * MIB)),
                        seconds=(0.010, 0.0060, 0.0059, 0.0050))
    none = lambda b: 0  # noqa: E731
    assert fastest_fit(model, 200 * MIB, none) == 8
    assert fastest_fit(model, 97 * MIB, none) == 2  # 4 is within TIE of 2's speed: 2 holds less
    assert fastest_fit(model, 93 * MIB, none) == 2
    assert fastest_fit(model, 91 * MIB, none) == 1
    assert fastest_fit(model, 90.5 * MIB, none) == 0  # not even one patch per call


@pytest.mark.quick
def test_doubling_stops_after_a_probe_without_gain(monkeypatch):
    assert memory.worth_probing([0.010, 0.008, 0.0075])  # 0.008 gained 20 % on 0.010, 0.0075 6 % on it
    assert not memory.worth_probing([0.010, 0.0099])
    assert not memory.worth_probing([0.010, 0.008, 0.0079])
    monkeypatch.setattr(memory, "PATIENCE", 2)  # two in a row, where noise matters more than a probe costs
    assert memory.worth_probing([0.010, 0.0099]) and not memory.worth_probing([0.010, 0.0099, 0.0098])


def sample(*args) -> tuple[subprocess.CompletedProcess, int]:
    """(the finished run, its peak RSS in bytes)."""
    return sample_peak("--steps", "2", "--threads", "1", *args)


@pytest.fixture(scope="module")
def activation_model(tmp_path_factory) -> Path:
    """A 128x128 image in one patch with base width 8: ~0.2 MiB of weights, ~130 MiB per call."""
    folder = tmp_path_factory.mktemp("activations")
    config = tiny_config(image_size=128, grid=1, base_width=8, use_position=False, use_gcc=False)
    export_onnx(write_checkpoint(folder / "c.pt", config), folder / "m.onnx", check=False)
    return folder / "m.onnx"


@pytest.fixture(scope="module")
def halo_model(tmp_path_factory) -> Path:
    """A 128x128 image in 2x2 patches of 64 with a halo of 16: 96x96 windows, ~70 MiB per call."""
    folder = tmp_path_factory.mktemp("halo")
    config = tiny_config(image_size=128, grid=2, base_width=8, halo=16, edge_mask=True)
    export_onnx(write_checkpoint(folder / "c.pt", config), folder / "m.onnx", check=False)
    return folder / "m.onnx"


@pytest.fixture(scope="module")
def int8_halo_model(tmp_path_factory) -> Path:
    """halo_model's network with int8 weights and activations (QLinearConv kernels)."""
    folder = tmp_path_factory.mktemp("halo8")
    (folder / "discs").mkdir()
    config = tiny_config(image_size=128, grid=2, base_width=8, halo=16, edge_mask=True)
    export_onnx(write_checkpoint(folder / "c.pt", config), folder / "m.onnx", check=False, weights="int8",
                calibration_data=str(blob_folder(folder / "discs", 16, 32)))
    return folder / "m.onnx"


@pytest.mark.parametrize("kind", ["loading dominates", "activations dominate", "halo windows", "int8 halo windows"])
def test_budget_holds_from_the_minimum_up(kind, request, tmp_path):
    """The issue's case first: the default model, -n 4, at the minimum it recommends, then +2M, +8M, +300M
    (where the planner takes the arena: the header says which allocation ran), fp32 and int8."""
    fixture = {"activations dominate": "activation_model", "halo windows": "halo_model",
               "int8 halo windows": "int8_halo_model"}.get(kind)
    model = ["--model", request.getfixturevalue(fixture)] if fixture else []
    images = 4 if kind == "loading dominates" else 2
    # Below the weights: refused before the model opens, with the weights' size and a lower bound.
    r, _ = sample(*model, "-n", images, "--memory-budget", "1M", "--out", tmp_path / "refused",
                  "--grid-image", tmp_path / "refused.png")
    message = r.stderr.replace(re.search(r"\nVmHWM.*", r.stderr).group(0), "").strip()
    found = re.fullmatch(r"Error: memory budget 1\.0M is below this model's minimum of (\d+\.\d)M at least: "
                         r"[\d.]+[KM] of weights on top of the [\d.]+M this process holds, before any activations; "
                         r"pass --memory-budget (\d+)M or more", message)
    assert r.returncode == 2 and found, r.stderr
    assert not (tmp_path / "refused").exists() and not (tmp_path / "refused.png").exists()
    # At that bound: measured, and refused with the run's real minimum (one patch per call).
    r, _ = sample(*model, "-n", images, "--memory-budget", f"{found.group(2)}M", "--out", tmp_path / "refused",
                  "--grid-image", tmp_path / "refused.png")
    message = r.stderr.replace(re.search(r"\nVmHWM.*", r.stderr).group(0), "").strip()
    found = re.search(r"Error: memory budget [\d.]+M is below this model's minimum of (\d+\.\d)M \(one patch per "
                      r"call\); pass --memory-budget (\d+)M or more$", message)
    assert r.returncode == 2 and found, r.stderr
    assert not (tmp_path / "refused").exists() and not (tmp_path / "refused.png").exists()
    minimum = float(found.group(1))
    assert int(found.group(2)) == math.ceil(minimum)

    peaks, allocations = [], []
    for budget in (f"{minimum:.1f}M", f"{minimum + 2:.1f}M", f"{minimum + 8:.1f}M", f"{minimum + 300:.1f}M"):
        out = tmp_path / budget
        r, peak = sample(*model, "-n", images, "--memory-budget", budget, "--out", out)
        assert r.returncode == 0, r.stderr
        assert len(list(out.glob("*.png"))) == images
        predicted = parse_size(re.search(r"predicted peak ([\d.]+M)", r.stderr).group(1))
        allocations.append(re.search(r"(\w+) allocation", r.stderr).group(1))
        peaks.append((budget, allocations[-1], peak / MIB, predicted / MIB))
        assert peak <= parse_size(budget), peaks
        assert peak <= predicted + 0.1 * MIB, peaks  # the prediction is an upper bound, not a guess
    assert allocations[0] == "lean" and allocations[-1] == "arena", peaks


FAKE_MEMINFO = """
import runpy, sys
from pathlib import Path
import patchgen.runtime.limits as limits
limits.PROC_MEMINFO = Path(sys.argv.pop(1))  # MemAvailable as the test writes it
limits.cgroup_memory_headroom = lambda: None  # and no container limit
sys.argv[0] = "patchgen-sample"
runpy.run_module("patchgen.cli.sample", run_name="__main__")
"""


@pytest.mark.parametrize("available_mib", [40, 4000])
def test_default_budget_is_a_share_of_the_memory_available(available_mib, tmp_path):
    """Without --memory-budget the run plans for DEFAULT_BUDGET_SHARE of what it can have (MemAvailable
    faked here) and keeps its peak within the peak it predicts (thread counts measured too); where the
    model's minimum is above it, the smallest peak."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal: 99999999 kB\nMemAvailable: {available_mib * 1024} kB\n")
    r = subprocess.run([sys.executable, "-c", FAKE_MEMINFO, str(meminfo), "-n", "2", "--steps", "2", "--out",
                        tmp_path / "out"], capture_output=True, text=True, timeout=300)  # threads: the planner's
    assert r.returncode == 0, r.stderr
    if available_mib == 40:  # ~0.75 x (RSS + 40M) is below this model's minimum: one patch, lean
        assert "above the default" in r.stderr and "lean allocation" in r.stderr, r.stderr
        return
    found = re.search(r"predicted peak ([\d.]+M) of the default budget ([\d.]+[MG])", r.stderr)
    assert found, r.stderr
    budget = parse_size(found.group(2))
    assert 0.75 * available_mib * MIB < budget < 0.75 * (available_mib + 200) * MIB
    peak = parse_size(re.search(r"peak RSS ([\d.]+M)", r.stderr).group(1))
    assert peak <= parse_size(found.group(1)) + 0.1 * MIB and "arena allocation" in r.stderr, r.stderr


GRID_CHILD = """
import sys
import numpy as np
from patchgen.runtime.images import grid_memory, new_grid, paste_into_grid, save_png
from patchgen.runtime.memory import current_rss, peak_rss
n, size = 400, 64
tile = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)  # noise: PNG cannot shrink it
save_png(sys.argv[1] + ".warm.png", tile)  # Pillow's encoder loaded before measuring
before = current_rss()
grid = new_grid(n, size, size, 3)
for k in range(n):
    paste_into_grid(grid, k, tile)
save_png(sys.argv[1], grid)
print(peak_rss() - before, grid_memory(n, size, size, 3))
"""


def test_grid_image_memory_is_charged_in_full(tmp_path):
    """--grid-image holds a canvas through the run and encodes it at the end: the plan charges grid_memory,
    which must cover what that costs a fresh process."""
    r = subprocess.run([sys.executable, "-c", GRID_CHILD, str(tmp_path / "grid.png")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    added, charged = map(int, r.stdout.split())
    assert 0 < added <= charged, (added / MIB, charged / MIB)
