"""Peak resident memory as the kernel reports it, byte sizes, and the memory plan for a budget.

The plan is a measured model of this process: peak(b) = floor + fixed + b * per_patch,
where floor is the resident size after the session is open (interpreter, numpy,
onnxruntime, weights, image buffers) and fixed + b * per_patch is what one
onnxruntime call of b patches adds, measured at b = 1 and b = 2.
"""
from __future__ import annotations

import re
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .errors import PatchgenError
from .limits import available_memory

_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20, "MIB": 2**20,
          "G": 2**30, "GB": 2**30, "GIB": 2**30}
MIB = 2**20


def parse_size(text: str) -> int:
    """'200M', '1.5G', '512MiB', '300000000' -> bytes (K, M, G are powers of 1024)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise PatchgenError(f"cannot read memory size {text!r}; write it like 200M or 1.5G")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def format_size(n: float) -> str:
    """Bytes as MiB with one decimal, the unit parse_size reads back: 93.4M."""
    return f"{n / MIB:.1f}M"


def _status_kib(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss() -> int:
    """Peak resident set size of this process in bytes: VmHWM, else ru_maxrss."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB on Linux


def current_rss() -> int:
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else peak_rss()


def cap_to_available(budget: int) -> tuple[int, tuple[str, ...]]:
    """(the budget, notes): a budget above what this process can reach (MemAvailable, a cgroup memory
    limit) is capped to that, with a note saying so; a budget below 1 byte is refused."""
    if budget < 1:
        raise PatchgenError(f"memory budget must be positive, got {budget} bytes; write it like 200M or 1.5G")
    limit, what = available_memory(current_rss())
    if limit is not None and budget > limit:
        return limit, (f"memory budget {format_size(budget)} is more than this process can have "
                       f"({format_size(limit)}, {what}); planning for {format_size(limit)}",)
    return budget, ()


@dataclass(frozen=True)
class MemoryModel:
    floor: int  # bytes resident before any call: interpreter, libraries, session, weights
    fixed: int  # bytes one call adds whatever its size
    per_patch: int  # bytes one call adds per patch

    def peak(self, patch_batch: int) -> int:
        return self.floor + self.fixed + patch_batch * self.per_patch


SAFETY = 1.10  # the per-patch slope is charged 10 % more than measured


def measure_call(run: Callable[[int], None], patch_batch: int) -> int:
    """The process's peak RSS after one call of `patch_batch` patches."""
    run(patch_batch)
    return peak_rss()


def calibrate(run: Callable[[int], None], budget: int, max_batch: int) -> MemoryModel:
    """Fit peak(b) = floor + fixed + b * per_patch from calls of b = 1, 2, 4, ... patches; `run(b)` makes one.

    A first call warms up (thread pools, kernel choice). The high-water mark is never reset, so every
    probe counts against the budget as the kernel sees it: the probe batch doubles only while the last
    slope, charged 1.5x, predicts the next probe fits. The line goes through the two largest probes,
    where the slope is steadiest (small probes can hide under the peak of loading the model).
    """
    run(1)
    floor = current_rss()
    points = [(1, measure_call(run, 1))]
    while points[-1][0] < max_batch:
        b, peak = points[-1]
        slope = (peak - points[-2][1]) / (b - points[-2][0]) if len(points) > 1 else peak - floor
        nb = min(2 * b, max_batch)
        if peak + 1.5 * slope * (nb - b) > budget:
            break
        points.append((nb, measure_call(run, nb)))
    if len(points) == 1:  # only one patch fits: charge each patch the whole increase of one call
        return MemoryModel(floor, 0, max(points[0][1] - floor, 0))
    (b0, p0), (b1, p1) = points[-2:]
    slope = max((p1 - p0) / (b1 - b0), 0.0)
    return MemoryModel(floor, max(int(p1 - floor - b1 * slope), 0), int(SAFETY * slope))


def plan_patch_batch(model: MemoryModel, budget: int, max_batch: int, margin: int) -> int:
    """The largest patch batch (<= max_batch) whose predicted peak + margin fits `budget`."""
    minimum = model.peak(1) + margin
    if budget < minimum:
        raise PatchgenError(f"memory budget {format_size(budget)} is below this model's minimum of "
                            f"{format_size(minimum)} (one patch per call); pass --memory-budget "
                            f"{-(-minimum // MIB)}M or more")
    if model.per_patch == 0:
        return max_batch
    return int(max(1, min(max_batch, (budget - margin - model.floor - model.fixed) // model.per_patch)))
