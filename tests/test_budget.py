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
from patchgen.runtime.memory import MIB, calibrate, parse_size, plan_patch_batch
from patchgen.runtime.spec import ModelSpec

from conftest import sample_peak, tiny_config, write_checkpoint

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


def test_capped_budget_plans_one_patch_when_only_one_fits(monkeypatch):
    """A budget capped to what the process can have (here a cgroup limit of 300 MiB) is planned for: one patch
    per call, no two-patch probe run, and a refusal under the cap says both."""
    spec = ModelSpec(image_size=16, channels=3, grid=2, use_position=True, use_gcc=True)
    model = types.SimpleNamespace(spec=spec, weights_bytes=0, resident_before=0)  # probes simulated below
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


@pytest.mark.parametrize("kind", ["loading dominates", "activations dominate", "halo windows"])
def test_budget_holds_from_the_minimum_up(kind, request, tmp_path):
    """The issue's case first: the default model, -n 4, at the minimum it recommends, then +2M, +8M, +300M."""
    fixture = {"activations dominate": "activation_model", "halo windows": "halo_model"}.get(kind)
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

    peaks = []
    for budget in (f"{minimum:.1f}M", f"{minimum + 2:.1f}M", f"{minimum + 8:.1f}M", f"{minimum + 300:.1f}M"):
        out = tmp_path / budget
        r, peak = sample(*model, "-n", images, "--memory-budget", budget, "--out", out)
        assert r.returncode == 0, r.stderr
        assert len(list(out.glob("*.png"))) == images
        predicted = parse_size(re.search(r"predicted peak ([\d.]+M)", r.stderr).group(1))
        peaks.append((budget, peak / MIB, predicted / MIB))
        assert peak <= parse_size(budget), peaks
        assert peak <= predicted + 0.1 * MIB, peaks  # the prediction is an upper bound, not a guess


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
