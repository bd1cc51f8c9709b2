"""Peak resident memory as the kernel reports it, byte sizes, and the memory plan for a budget.

A budget is a promise about the kernel's high-water mark of resident memory (VmHWM; `ru_maxrss` is the
same figure) for the whole run: imports, opening the session, calibration and sampling. The plan for b
patches per call predicts that run's peak as

    max(reached, floor + call(b) + extra(b))

reached  the high-water mark already set by loading the session and calibrating: a fact no plan undoes;
floor    the resident size between calls after calibration, which first runs one real sampler step of
         one image and encodes its PNG, so that what sampling loads on first use (numpy.random, for
         one, is imported then) is resident before anything is measured;
call(b)  what one onnxruntime call of b patches adds over the resident size before it;
extra(b) what sampling holds beside a call (the images in flight, PNG encoding): the caller's charge.

How call(b) is measured. The kernel keeps only the high-water mark, so a call whose peak stays under an
earlier one (loading peaks above its resting size; so does the warm-up step) does not move it: "mark
after - mark before" then reads 0, and a slope fitted to such probes is ~0. What always holds is
call(b) <= mark after - RSS before: exact when the call set a new mark, an upper bound when it was
hidden. `measure_call` returns that, so a hidden probe over-charges and never under-charges.

Which probes run. Calls of 1, 2, 4, ... patches, then the largest batch predicted to fit; a probe is
run only when its batch is predicted to fit the budget, sampling's extra included. That prediction
extrapolates beyond the largest call measured on a line through the origin, charged SAFETY, because
activations scale with the batch; a small call can be partly served from free heap, so an early
doubling may cost a little more than twice, which the charge and extra(b) absorb. The warm-up and
the one-patch call are not held back: they are the smallest run there is, and when they do not fit,
the run is refused before it writes anything.

What the plan uses. Only measured bytes: a batch is charged the call of the smallest measured batch at
least as large, and no batch beyond the largest measured is planned. Noise between calls of the same
batch is small against the caller's fixed charge (benchmarks/budget_sweep.py).

Why the mark is never reset. Linux can reset it (writing 5 to /proc/self/clear_refs, which any process
may do for itself), and hidden calls would then show. But the reset also lowers `ru_maxrss`, for this
process and for whoever waits on it, so the run's own report, the benchmarks and the tests would all
read less than the peak the run really had.

A fresh process loads with a slightly different high-water mark and floor, so the minimum that a
refusal names is RERUN_MARGIN above this process's prediction for one patch, and a rerun given it
plans within it. benchmarks/budget_sweep.py repeats every budget in fresh processes; its results
(results/budget_sweep.md) show how much the peak and the minimum move and how far below each budget
the peak stays.
"""
from __future__ import annotations

import math
import re
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

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
    """Bytes with one decimal in a unit parse_size reads back: MiB (93.4M), KiB below 1 MiB, GiB from 10 GiB."""
    if n < MIB:
        return f"{n / 2**10:.1f}K"
    if n >= 10 * 2**30:
        return f"{n / 2**30:.1f}G"
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


def cap_to_available(budget: int) -> tuple[int, str]:
    """(the budget, what limits it): a budget above what this process can reach as peak RSS is capped to
    that, and the second item names the limit ("MemAvailable", "the cgroup memory limit"); "" when the
    budget stands as given. A budget below 1 byte is refused."""
    if budget < 1:
        raise PatchgenError(f"memory budget must be positive, got {budget} bytes; write it like 200M or 1.5G")
    limit, what = available_memory(current_rss())
    if limit is not None and budget > limit:
        return limit, what
    return budget, ""


class BudgetTooSmall(PatchgenError):
    """Not even one patch per call fits the budget; `minimum` (bytes) is a budget a fresh run accepts."""

    def __init__(self, message: str, minimum: float):
        super().__init__(message)
        self.minimum = minimum


SAFETY = 1.10  # bytes extrapolated beyond the largest measured call are charged 10 % more
RERUN_MARGIN = 2 * MIB  # a refusal's minimum sits this far above this process's prediction (see above)


def checked_budget(memory_budget: Union[int, str], weights: int, resident: int) -> tuple[int, str]:
    """(the budget in bytes, capped to what this process can have; what capped it, "" when nothing did).

    memory_budget: bytes, or a size parse_size reads. Refused up front, before any memory is spent on the
    model: a budget below 1 byte, and one below `resident` bytes (what the process holds before the model
    opens) plus the model's `weights` bytes, which every run holds once whatever its patch batch
    (BudgetTooSmall; its minimum is that sum plus RERUN_MARGIN, a budget this check accepts in a fresh run;
    the run's real minimum adds a call's activations, and the planner names it)."""
    asked = parse_size(memory_budget) if isinstance(memory_budget, str) else int(memory_budget)
    budget, limited_by = cap_to_available(asked)
    need = resident + weights
    if budget < need:
        minimum = math.ceil((need + RERUN_MARGIN) / MIB * 10) / 10  # a fresh process holds a little more or less
        if limited_by:
            raise PatchgenError(f"this model needs at least {minimum:.1f}M ({format_size(weights)} of weights on top "
                                f"of the {format_size(resident)} this process holds), but this process can have only "
                                f"{format_size(budget)} ({limited_by}): free memory or raise the memory limit")
        raise BudgetTooSmall(f"memory budget {format_size(budget)} is below this model's minimum of {minimum:.1f}M "
                             f"at least: {format_size(weights)} of weights on top of the {format_size(resident)} this "
                             f"process holds, before any activations; pass --memory-budget {math.ceil(minimum)}M or "
                             f"more", minimum * MIB)
    return budget, limited_by




def measure_call(run: Callable[[int], None], patch_batch: int) -> int:
    """Bytes one call of `patch_batch` patches adds at most over the resident size before it: the high-water
    mark after it minus the RSS before it (exact when the call set a new mark, an upper bound when hidden)."""
    before = current_rss()
    run(patch_batch)
    return max(peak_rss() - before, 0)


@dataclass(frozen=True)
class MemoryModel:
    reached: int  # bytes: the high-water mark after loading and calibrating
    floor: int  # bytes resident between calls, after calibration
    calls: tuple[tuple[int, int], ...]  # (patch batch, bytes its call added at most), batches increasing

    @property
    def largest(self) -> int:
        """The largest patch batch measured: a plan never goes beyond it."""
        return self.calls[-1][0]

    def call_bytes(self, patch_batch: int) -> int:
        """Bytes a call of `patch_batch` patches adds, at most: the bytes of the smallest measured batch at least
        as large (a running max keeps them growing with the batch despite noise), or beyond the largest
        batch its bytes scaled by the batch and charged SAFETY."""
        most = 0
        for b, added in self.calls:
            most = max(most, added)
            if b >= patch_batch:
                return most
        return int(SAFETY * most * patch_batch / self.largest)

    def peak(self, patch_batch: int, extra: int = 0) -> int:
        """Predicted peak RSS of the whole run sampling with `patch_batch` patches per call, with `extra`
        bytes held beside each call."""
        return max(self.reached, self.floor + self.call_bytes(patch_batch) + extra)


def largest_fit(model: MemoryModel, budget: int, batches: Sequence[int], extra: Callable[[int], int]) -> int:
    """The largest of `batches` (increasing) whose predicted peak, with extra(b), fits `budget`; 0 if none."""
    low, high = 0, len(batches)  # the predicted peak grows with the batch: bisect; batches[:low] all fit
    while low < high:
        mid = (low + high) // 2
        low, high = (mid + 1, high) if model.peak(batches[mid], extra(batches[mid])) <= budget else (low, mid)
    return batches[low - 1] if low else 0


def calibrate(warm_up: Callable[[], None], run: Callable[[int], None], budget: int, batches: Sequence[int],
              extra: Callable[[int], int]) -> MemoryModel:
    """Measure this process: `warm_up()` runs the smallest sampling there is, then `run(b)` makes calls of
    b = 1, 2, 4, ... patches (from `batches`, increasing from 1) while the doubled batch is predicted to fit
    `budget` with the extra(b) bytes sampling holds beside a call, and last of the largest batch predicted to
    fit: a plan's batch is one measured, or smaller."""
    def measured(model: Optional[MemoryModel], b: int) -> MemoryModel:
        calls = (*(model.calls if model else ()), (b, measure_call(run, b)))
        return MemoryModel(peak_rss(), max(model.floor if model else 0, current_rss()), calls)

    warm_up()
    model = measured(None, batches[0])
    while model.largest < batches[-1]:
        within = [b for b in batches if b <= 2 * model.largest]
        b = largest_fit(model, budget, within, extra)
        if b <= model.largest:
            break
        model = measured(model, b)
        if b < within[-1]:  # the budget's edge is measured; closer probes would gain little
            break
    return model


def plan_patch_batch(model: MemoryModel, budget: int, batches: Sequence[int], extra: Callable[[int], int]) -> int:
    """The largest of `batches`, up to the largest measured, whose predicted peak with extra(b) fits `budget`;
    when not even the smallest fits, a PatchgenError that names the minimum a fresh run will accept."""
    pb = largest_fit(model, budget, [b for b in batches if b <= model.largest], extra)
    if pb == 0:
        minimum = math.ceil((model.peak(batches[0], extra(batches[0])) + RERUN_MARGIN) / MIB * 10) / 10  # MiB, up
        raise BudgetTooSmall(f"memory budget {format_size(budget)} is below this model's minimum of "
                             f"{minimum:.1f}M (one patch per call); pass --memory-budget {math.ceil(minimum)}M "
                             f"or more", minimum * MIB)
    return pb
