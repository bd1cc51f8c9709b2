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

Speed. A budget buys the fastest configuration whose predicted peak fits it, not the largest batch. The
probes are timed (`probe_call`: a short call runs twice, the faster counts, so first-call costs do not);
doubling stops once PATIENCE probes in a row gained less than GAIN per patch, which bounds the start-up
cost, and the plan takes the fastest measured batch that fits (`fastest_fit`; within TIE of it, the
smaller). With onnxruntime's arena ("arena" allocation, session.py) a call's blocks stay resident after
it, so `calibrate_arena` reads a batch's cost in the resident size after its probe, and its model's floor
holds the arena at its largest; make_plan decides between the two allocations (generate.py).
Without a budget a run plans for DEFAULT_BUDGET_SHARE of the memory it can have (`default_budget`);
MIN_BUDGET ("min") asks for the smallest peak: lean, one patch per call, nothing measured.

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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from .errors import ArgumentError, PatchgenError
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


def file_rss() -> int:
    """Bytes of this process's resident set that are file pages (RssFile: mapped weights, libraries); 0 where
    the kernel does not say."""
    kib = _status_kib("RssFile")
    return kib * 1024 if kib is not None else 0


MIN_BUDGET = "min"  # --memory-budget min: the smallest peak (memory-first allocation, one patch per call)
# Without a budget, the run plans for this share of the memory the process can have (MemAvailable, a cgroup
# limit): the rest is the margin for everything else on the machine, whose use moves while the run goes.
DEFAULT_BUDGET_SHARE = 0.75


def wants_minimum(memory_budget) -> bool:
    """Whether `memory_budget` asks for the smallest peak ("min", any case) rather than a size."""
    return isinstance(memory_budget, str) and memory_budget.strip().lower() == MIN_BUDGET


def given_budget(memory_budget) -> Optional[int]:
    """The budget in bytes when one was given as a size (bytes or text parse_size reads); None for no budget
    and for "min" (`wants_minimum`)."""
    if memory_budget is None or wants_minimum(memory_budget):
        return None
    return parse_size(memory_budget) if isinstance(memory_budget, str) else int(memory_budget)


def default_budget(resident: int) -> tuple[Optional[int], str]:
    """(the budget of a run given none: DEFAULT_BUDGET_SHARE of what a process holding `resident` bytes can
    reach, what limits that), or (None, "") where nothing is known (no /proc/meminfo, no cgroup)."""
    limit, what = available_memory(resident)
    return (None, "") if limit is None else (int(DEFAULT_BUDGET_SHARE * limit), what)


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


class BudgetTooSmall(ArgumentError):
    """The memory budget cannot hold the run, not even at one patch per call. problem: why; `minimum`
    (bytes): a budget a fresh run accepts, asked for in whole MiB; alternative: another fix ("resize the
    image"); arguments: those the problem names (ArgumentError), memory_budget aside."""

    def __init__(self, problem: str, minimum: float, alternative: str = "", **arguments: Optional[object]):
        self.minimum = minimum
        other = ", or " + alternative if alternative else ""
        super().__init__(f"{problem}; ", "pass {memory_budget} or more" + other, **arguments,
                         memory_budget=f"{math.ceil(minimum / MIB)}M")


SAFETY = 1.10  # bytes extrapolated beyond the largest measured call are charged 10 % more
RERUN_MARGIN = 2 * MIB  # a refusal's minimum sits this far above this process's prediction (see above)


def fresh_minimum(need: float) -> float:
    """The minimum budget (bytes) a refusal names for a predicted peak of `need` bytes: RERUN_MARGIN above it
    (a fresh process holds a little more or less), rounded up to 0.1 MiB."""
    return math.ceil((need + RERUN_MARGIN) / MIB * 10) / 10 * MIB


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
        minimum = fresh_minimum(need)
        if limited_by:
            raise PatchgenError(f"this model needs at least {minimum / MIB:.1f}M ({format_size(weights)} of weights on "
                                f"top of the {format_size(resident)} this process holds), but this process can have "
                                f"only {format_size(budget)} ({limited_by}): free memory or raise the memory limit")
        raise BudgetTooSmall(f"memory budget {format_size(budget)} is below this model's minimum of "
                             f"{minimum / MIB:.1f}M at least: {format_size(weights)} of weights on top of the "
                             f"{format_size(resident)} this process holds, before any activations", minimum)
    return budget, limited_by




def measure_call(run: Callable[[int], None], patch_batch: int) -> int:
    """Bytes one call of `patch_batch` patches adds at most over the resident size before it: the high-water
    mark after it minus the RSS before it (exact when the call set a new mark, an upper bound when hidden)."""
    return timed_call(run, patch_batch)[0]


def timed_call(run: Callable[[int], None], patch_batch: int) -> tuple[int, float]:
    """(`measure_call`'s bytes, the call's wall-clock seconds)."""
    before = current_rss()
    t0 = time.perf_counter()
    run(patch_batch)
    seconds = time.perf_counter() - t0
    return max(peak_rss() - before, 0), seconds


GAIN = 0.05  # a doubled batch counts as faster when it is at least this much faster per patch
# Doubling stops after this many probes in a row that were not faster (`worth_probing`). One: every probe
# beyond the fastest costs its arena's memory and its calls' time, and a larger batch gains a few per cent
# at most once one did not (results/budget_speed.md); a noisy timing can stop the search one doubling early.
PATIENCE = 1
TIE = 1.03  # a batch within this factor of the fastest per patch, and smaller, is chosen instead (less memory)
REPEAT_UNDER_S = 1.0  # a probe call shorter than this is run twice, and the faster timing kept


def probe_call(run: Callable[[int], None], patch_batch: int) -> tuple[int, float]:
    """(bytes, seconds per patch) of a calibration probe: a call of `patch_batch` patches, run again when it
    was short, so that its first-call costs (an arena growing, buffers faulted in) do not count as its speed.
    The bytes are the larger of the two measurements; the time the shorter."""
    added, seconds = timed_call(run, patch_batch)
    if seconds < REPEAT_UNDER_S:
        again, repeat = timed_call(run, patch_batch)
        added, seconds = max(added, again), min(seconds, repeat)
    return added, seconds / patch_batch


@dataclass(frozen=True)
class Calibration:
    """What calibrating this process measured (`calibrate`, `calibrate_arena`): its peak and resident bytes and
    the bytes (and seconds) of each probed patch batch's call, from which a plan predicts any batch's peak."""

    reached: int  # bytes: the high-water mark after loading and calibrating
    floor: int  # bytes resident between calls, after calibration
    calls: tuple[tuple[int, int], ...]  # (patch batch, bytes its call added at most), batches increasing
    seconds: tuple[float, ...] = ()  # seconds per patch of each of `calls` (timed calibration), same order
    allocation: str = "lean"  # the session allocation mode these were measured with (session.ALLOCATIONS)

    def seconds_per_patch(self, patch_batch: int) -> Optional[float]:
        """Measured seconds per patch at `patch_batch` (a measured batch), None when not timed."""
        return dict(zip((b for b, _ in self.calls), self.seconds)).get(patch_batch)

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


def largest_fit(calibration: Calibration, budget: int, batches: Sequence[int], extra: Callable[[int], int]) -> int:
    """The largest of `batches` (increasing) whose predicted peak, with extra(b), fits `budget`; 0 if none."""
    low, high = 0, len(batches)  # the predicted peak grows with the batch: bisect; batches[:low] all fit
    while low < high:
        mid = (low + high) // 2
        low, high = (mid + 1, high) if calibration.peak(batches[mid], extra(batches[mid])) <= budget else (low, mid)
    return batches[low - 1] if low else 0


def calibrate(warm_up: Optional[Callable[[], None]], run: Callable[[int], None], budget: int,
              batches: Sequence[int], extra: Callable[[int], int], timed: bool = False) -> Calibration:
    """Measure this process: `warm_up()` runs the smallest sampling there is (None: the caller ran it), then
    `run(b)` makes calls of b = 1, 2, 4, ... patches (from `batches`, increasing from 1) while the doubled
    batch is predicted to fit `budget` with the extra(b) bytes sampling holds beside a call, and last of the
    largest batch predicted to fit: a plan's batch is one measured, or smaller. timed: each probe is timed
    too (`probe_call`), and doubling stops once it no longer gains speed (`worth_probing`)."""
    def measured(calibration: Optional[Calibration], b: int) -> Calibration:
        added, seconds = probe_call(run, b) if timed else (measure_call(run, b), 0.0)
        calls = (*(calibration.calls if calibration else ()), (b, added))
        times = (*(calibration.seconds if calibration else ()), seconds) if timed else ()
        return Calibration(peak_rss(), max(calibration.floor if calibration else 0, current_rss()), calls, times)

    if warm_up is not None:
        warm_up()
    calibration = measured(None, batches[0])
    while calibration.largest < batches[-1]:
        within = [b for b in batches if b <= 2 * calibration.largest]
        b = largest_fit(calibration, budget, within, extra)
        if b <= calibration.largest:
            break
        calibration = measured(calibration, b)
        if b < within[-1] or (timed and not worth_probing(calibration.seconds)):  # the budget's edge, or no gain
            break
    return calibration


def worth_probing(seconds: Sequence[float]) -> bool:
    """Whether doubling the batch again may still pay: false once PATIENCE probes in a row were not GAIN
    faster per patch than the fastest before them."""
    best, stale = seconds[0], 0
    for s in seconds[1:]:
        stale = 0 if s <= (1 - GAIN) * best else stale + 1
        best = min(best, s)
    return stale < PATIENCE


# The arena's one-patch call, before it is measured, is charged this times what the same call added in the
# lean session: the arena keeps those blocks (rounded up to its sizes) for the rest of the run.
ARENA_PRIOR = 1.5
# The arena's growth beyond the largest call measured is extrapolated with this charge: its blocks come in
# the sizes onnxruntime's best-fit arena rounds to, and a larger call may fit them less tightly.
ARENA_SAFETY = 1.25


def _arena_probe(run: Callable[[int], None], b: int, base: int, base_file: int) -> tuple[int, float, tuple[int, int]]:
    """One probe of an arena session: a call of `b` patches grows the arena, then `probe_call` times and
    measures calls served from it. (bytes such a call adds, seconds per patch, (file, other) bytes over `base`
    after the probe): footprint = max(RSS after, the mark when the probe moved it) - base, of which the file
    pages (the mapped weights, faulted in by the first call, `base_file` before it) stay whatever the batch,
    and the rest, the arena and its bookkeeping, grows with it."""
    mark = peak_rss()
    timed_call(run, b)  # grows the arena to this batch
    added, per_patch = probe_call(run, b)
    footprint = max(current_rss(), peak_rss() if peak_rss() > mark else 0) - base
    in_files = min(max(file_rss() - base_file, 0), max(footprint, 0))
    return added, per_patch, (in_files, max(footprint - in_files, 0))


def calibrate_arena(run: Callable[[int], None], budget: int, batches: Sequence[int],
                    extra: Callable[[int], int]) -> Calibration:
    """Measure this process with an "arena" session (session.ALLOCATIONS) opened just now, before its first
    call, after a lean warm-up (what sampling loads on first use is already resident).

    An arena keeps a call's blocks for the next one, so what a batch costs shows in the resident size after
    its call, not only in the high-water mark (`_arena_probe`). A larger batch B is probed only when
    base + file + ARENA_SAFETY * rest(L) * B / L + extra(B) fits `budget`, base the RSS before the first
    call, file and rest what the probe of L, the largest batch measured, left; and while doubling gains
    speed (`worth_probing`). The first probe, one patch, is the caller's to have checked (make_plan charges
    it from the lean call it measured).

    The returned calibration: reached = the mark after calibration, floor = the RSS after it (the arena at its
    largest, held for the rest of the run), calls = each batch's second-call bytes, seconds per patch."""
    base, base_file = current_rss(), file_rss()
    calls: list[tuple[int, int]] = []
    seconds: list[float] = []
    grown = (0, 0)  # (file bytes, other bytes) over base after the last probe, the largest batch's

    def probe(b: int) -> None:
        nonlocal grown
        added, per_patch, grown = _arena_probe(run, b, base, base_file)
        calls.append((b, added))
        seconds.append(per_patch)

    def predicted(b: int) -> float:
        return max(peak_rss(), base + grown[0] + ARENA_SAFETY * grown[1] * b / calls[-1][0] + extra(b))

    probe(batches[0])
    while calls[-1][0] < batches[-1]:
        within = [b for b in batches if calls[-1][0] < b <= 2 * calls[-1][0]]
        fits = [b for b in within if predicted(b) <= budget]
        if not fits:
            break
        probe(fits[-1])
        if fits[-1] < within[-1] or not worth_probing(seconds):
            break
    return Calibration(peak_rss(), current_rss(), tuple(calls), tuple(seconds), "arena")


def fastest_fit(calibration: Calibration, budget: int, extra: Callable[[int], int]) -> int:
    """The measured batch with the fewest seconds per patch whose predicted peak, with extra(b), fits
    `budget`; of batches within TIE of that speed, the smallest (the same speed for less memory). 0 when none
    fits. An untimed calibration: the largest that fits."""
    fits = [b for b, _ in calibration.calls if calibration.peak(b, extra(b)) <= budget]
    if not fits or not calibration.seconds:
        return fits[-1] if fits else 0
    best = min(calibration.seconds_per_patch(b) for b in fits)
    return min(b for b in fits if calibration.seconds_per_patch(b) <= TIE * best)


def plan_patch_batch(calibration: Calibration, budget: int, batches: Sequence[int], extra: Callable[[int], int]) -> int:
    """A timed calibration (calibrated with timed=True): the fastest measured batch that fits (`fastest_fit`);
    else the largest of `batches`, up to the largest measured, whose predicted peak with extra(b) fits
    `budget`. When not even the smallest fits, a PatchgenError that names the minimum a fresh run accepts."""
    pb = (fastest_fit(calibration, budget, extra) if calibration.seconds
          else largest_fit(calibration, budget, [b for b in batches if b <= calibration.largest], extra))
    if pb == 0:
        minimum = fresh_minimum(calibration.peak(batches[0], extra(batches[0])))
        raise BudgetTooSmall(f"memory budget {format_size(budget)} is below this model's minimum of "
                             f"{minimum / MIB:.1f}M (one patch per call)", minimum)
    return pb
