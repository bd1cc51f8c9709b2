"""The product API: sample images from a patchgen ONNX file under a memory budget.

`make_plan` checks a request against the model and chooses, by measuring real calls, the fastest setup
(allocation, patch batch, threads) whose peak fits the budget; `iter_samples` runs a plan; `generate` does
both. Nothing can be sampled from an unchecked request: a Plan is the proof it was checked.
"""
from __future__ import annotations

import functools
import importlib.metadata
import io
import math
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import numpy as np

from .errors import ArgumentError, PatchgenError
from .images import to_uint8, write_png
from .edit import Edit, ImageInput, make_edit
from .loop import SAMPLERS, default_sampler, default_steps, edit_timesteps, sample_images
from . import memory
from .memory import (ARENA_PRIOR, DEFAULT_BUDGET_SHARE, MIB, BudgetTooSmall, calibrate, calibrate_arena,
                     checked_budget, fastest_fit, format_size, fresh_minimum, plan_patch_batch)
from .limits import available_cpus
from .model import OnnxModel, default_threads, load_model, thread_candidates
from .session import DEFAULT_PROVIDER
from .spec import ModelSpec, example_feeds, graph_inputs

# Full-size float32 arrays alive per image in flight: x_t, x0_hat, eps, the sampler's temporaries, and room
# to spare. Charged on top of the measured model of the session, with a halo model's zero-bordered x_t.
IMAGE_ARRAYS = 8
# An edit holds per image the noise its known pixels are re-noised with, and the projection's temporary; and
# once the input image (charged as one more array: it is shared by the run's images).
EDIT_ARRAYS = 3
OVERHEAD = 4 * MIB  # PNG encoding and Python bookkeeping during sampling
# What the warm-up step leaves resident beyond one call (the sampler's calls at other timesteps, its
# arrays and the PNG encoder settling in): 2-3 MiB measured with numpy 2 and onnxruntime 1.32 on x86-64
# (faces64_2x2, 64x64), and 3 MiB in tests/test_budget.py's simulated processes.
WARM_UP_SETTLING = 4 * MIB
UNLIMITED = 2**62  # the budget where nothing is known about the machine's memory (no /proc, no cgroup)
MAX_SEED = 2**32 - 1  # (seed, image index) seed one generator as two 32-bit words: one-to-one below this


@dataclass(frozen=True)
class Request:
    """What to sample, checked against a model's spec by `sampling_request`."""

    num_images: int
    seed: int  # image i is a function of (seed, i) only
    sampler: str
    steps: int
    eta: Optional[float]  # DDIM's noise; None for the samplers that have none (ddpm is ancestral, dpm++ is deterministic)
    edit: Optional[Edit] = None  # img2img, inpainting or outpainting: what the images start from (edit.py)

    @property
    def steps_run(self) -> int:
        """The sampler steps each image runs: all of them, or an edit's share (`loop.edit_timesteps`)."""
        return self.steps if self.edit is None else \
            len(edit_timesteps(np.arange(self.steps), self.edit.strength))


def sampling_request(spec: ModelSpec, num_images: int = 1, seed: int = 0, sampler: Optional[str] = None,
                     steps: Optional[int] = None, eta: Optional[float] = None, edit: Optional[Edit] = None) -> Request:
    """A Request with defaults filled in for this model (the sampler: `default_sampler`; steps per its T; eta 0
    for ddim), or a PatchgenError."""
    T = spec.schedule.num_timesteps
    sampler = default_sampler(eta, edit.jumps if edit is not None else 0) if sampler is None else sampler
    if sampler not in SAMPLERS:
        raise PatchgenError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if num_images < 1:
        raise PatchgenError(f"number of images must be >= 1, got {num_images}")
    if not 0 <= seed <= MAX_SEED:
        raise PatchgenError(f"seed must be between 0 and {MAX_SEED}, got {seed}")
    steps = default_steps(sampler, T) if steps is None else steps
    if not 1 <= steps <= T:
        raise PatchgenError(f"steps must be between 1 and {T} (this model's T), got {steps}")
    if edit is not None and edit.jumps and sampler == "dpm++":
        raise ArgumentError("{repaint_jumps} needs the ddim or ddpm sampler: dpm++'s multistep update keeps the "
                            "previous step, which a jump back would break", "", repaint_jumps=None)
    if sampler == "ddim":
        eta = 0.0 if eta is None else float(eta)
        if not 0.0 <= eta <= 1.0:  # also refuses NaN
            raise PatchgenError(f"eta must be between 0 and 1, got {eta}")
    elif eta is not None:
        what = "ancestral (its noise is fixed, eta = 1)" if sampler == "ddpm" else "deterministic"
        raise ArgumentError(f"eta applies to the ddim sampler only; {sampler} is {what}: ", "drop {eta}", eta=None)
    return Request(num_images, seed, sampler, steps, eta, edit)


@dataclass(frozen=True)
class Plan:
    request: Request
    patch_batch: int  # patches per onnxruntime call
    images_per_run: int  # images sampled together (sharing calls)
    budget: Optional[int] = None  # bytes of peak RSS the plan keeps under, when a budget was given
    predicted_peak: Optional[int] = None  # bytes, when a budget chose the batch
    notes: tuple[str, ...] = ()  # what the user should be told (e.g. a budget capped to the memory available)
    allocation: str = "lean"  # the session's allocation mode (session.ALLOCATIONS) the plan runs with
    seconds_per_patch: Optional[float] = None  # measured at the chosen batch, when the planner measured speed
    default_budget: bool = False  # the budget was the default one (a share of the memory available)

    def seconds_per_step(self, grid: int) -> Optional[float]:
        """Predicted seconds of one sampler step of one image (its patches that make a call), when measured."""
        return None if self.seconds_per_patch is None else self.seconds_per_patch * patches_per_image(
            grid, self.request.edit)


def patches_per_image(grid: int, edit: Optional[Edit] = None) -> int:
    """Network calls' patches per image and step: every patch, or those an inpainting paints (at least 1, so
    that batches divide by it)."""
    return grid**2 if edit is None else max(1, edit.masked_patches(grid))


def images_per_run(patch_batch: int, per_image: int, num_images: int) -> int:
    """Images sampled together when a call holds `patch_batch` patches and an image has `per_image` to make."""
    return max(1, min(num_images, patch_batch // per_image))


def image_bytes(model: OnnxModel, edit: Optional[Edit] = None) -> int:
    """Bytes charged per image in flight on top of the measured session model (an edit: EDIT_ARRAYS more)."""
    c, h, w = model.spec.image_shape
    m = model.spec.halo
    arrays = IMAGE_ARRAYS + (EDIT_ARRAYS if edit is not None else 0)
    return 4 * c * (arrays * h * w + ((h + 2 * m) * (w + 2 * m) if m else 0))


def call_input_bytes(spec: ModelSpec, patch_batch: int) -> int:
    """Bytes of the inputs of one call of `patch_batch` patches (`graph_inputs`: windows, t, one-hot
    positions, GCC), which the patch loop holds beside the call."""
    per_patch = sum(np.dtype(dtype).itemsize * math.prod(shape) for dtype, shape in graph_inputs(spec).values())
    return per_patch * patch_batch


def check_fits(model: OnnxModel, images: int, patch_batch: int, held_bytes: int = 0,
               budget: Optional[int] = None, edit: Optional[Edit] = None) -> None:
    """Refuse, before any of it is allocated, a run whose known buffers alone cannot fit: what the process
    holds now, `images` images in flight (`image_bytes`), one call's inputs and the `held_bytes` the caller
    keeps (a grid image), against `budget`, or without one the memory this process can have. The model's
    metadata sets these sizes, so a file that claims a huge image is refused here, not by the kernel."""
    parts = {"the image buffers": images * image_bytes(model, edit) + OVERHEAD,
             "one call's inputs": call_input_bytes(model.spec, patch_batch), "the grid image": held_bytes}
    resident = memory.current_rss()
    need = resident + sum(parts.values())
    what = f"{', '.join(f'{name} {format_size(b)}' for name, b in parts.items() if b)}, beside the " \
           f"{format_size(resident)} this process holds"
    if budget is not None:
        if need > budget:
            minimum = fresh_minimum(need)
            raise BudgetTooSmall(f"memory budget {format_size(budget)} is below this run's minimum of "
                                 f"{minimum / MIB:.1f}M at least ({what})", minimum)
        return
    limit, limited_by = memory.available_memory(resident)
    if limit is not None and need > limit:
        problem = (f"this run needs at least {format_size(need)} ({what}), but this process can have only "
                   f"{format_size(limit)} ({limited_by}); ")
        if held_bytes > need / 2:
            raise ArgumentError(problem, "write fewer images per grid, or leave out {held_bytes}", held_bytes=None)
        if images > 1:
            raise ArgumentError(problem, "run fewer patches per call ({patch_batch})", patch_batch=None)
        size = model.spec.image_size
        raise PatchgenError(f"{problem}this {size}x{size} model does not fit: free memory, or use a smaller model")


def probe(model: OnnxModel, request: Request):
    """(warm_up, run) for calibration. warm_up(): one sampler step of one image at one patch per call, and its
    PNG encoded in memory, so that what sampling loads on first use is resident before anything is measured.
    run(b): one onnxruntime call on b windows of noise, its inputs made inside the call as the patch loop
    makes them (it copies each call's windows and gcc rows), so their bytes count as the call's."""
    spec = model.spec

    def warm_up() -> None:
        x = sample_images(model, spec, num_images=1, seed=request.seed, steps=1, sampler=request.sampler,
                          eta=request.eta, patch_batch=1)
        write_png(io.BytesIO(), to_uint8(x)[0])

    def run(b: int) -> None:
        feeds = example_feeds(spec, np.full(b, spec.schedule.num_timesteps - 1), np.random.default_rng(b))
        model(feeds["x"], feeds["t"], feeds.get("pos"), feeds.get("gcc"))
    return warm_up, run


def make_plan(model: OnnxModel, num_images: int = 1, seed: int = 0, sampler: Optional[str] = None,
              steps: Optional[int] = None, eta: Optional[float] = None, *,
              memory_budget: Union[None, int, str] = None, patch_batch: Optional[int] = None,
              held_bytes: int = 0, held_per_image: int = 0, edit: Optional[Edit] = None) -> Plan:
    """Check the request, then choose how to run it: the fastest configuration whose whole-run peak RSS,
    calibration included, stays within the budget, measured on real calls (`_calibrated`).

    memory_budget: bytes or a size ("500M"); one above what this process can have (MemAvailable, a cgroup
    limit) is capped to that, and the Plan says so. None: DEFAULT_BUDGET_SHARE of that memory (when this
    model does not fit it, the smallest peak, with a note). "min": the smallest peak, measured nothing:
    the lean allocation and one patch per call. patch_batch: exactly that many patches per call, lean
    allocation, nothing measured (with a budget: refused; the budget chooses the batch).
    held_bytes: memory the caller holds through the run beside sampling (a grid image being filled);
    held_per_image: and per image in flight (a preview). edit: what an edited run starts from (`image_bytes`)."""
    request = sampling_request(model.spec, num_images, seed, sampler, steps, eta, edit)
    g2 = patches_per_image(model.spec.grid, edit)  # the patches of an image that make calls
    # Every plan starts from the lean session load_model opened (a model planned before may hold an arena,
    # which would hide what calls cost, and other threads).
    model.reopen("lean", model.threads if model.threads_chosen else default_threads())
    if patch_batch is not None and memory_budget is not None:
        raise PatchgenError("give either a memory budget or a patch batch, not both: the budget chooses the batch")
    if memory.wants_minimum(memory_budget) or patch_batch is not None:
        return _fixed_plan(model, request, g2, 1 if patch_batch is None else patch_batch, held_bytes, held_per_image)
    budget, limited_by, notes = _planning_budget(model, memory_budget)

    def extra(pb: int) -> int:  # held beside a call: the buffers of the images that batch runs together
        return OVERHEAD + held_bytes + images_per_run(pb, g2, num_images) * (image_bytes(model, edit) + held_per_image)

    try:
        if call_input_bytes(model.spec, 1) > budget:  # a file claiming absurd inputs: no call is made
            check_fits(model, 1, 1, held_bytes + held_per_image, budget, edit)
        mem, pb = _calibrated(model, request, budget, g2, extra)
    except BudgetTooSmall as e:
        if memory_budget is None:  # the default budget is a share of the memory: run at the smallest peak
            return _smallest_peak_plan(model, request, e.minimum, budget, held_bytes + held_per_image)
        if limited_by:  # asking for a larger budget cannot help
            raise _beyond_reach(e.minimum, budget, limited_by) from None
        raise
    return Plan(request, pb, images_per_run(pb, g2, num_images), budget, mem.peak(pb, extra(pb)), notes,
                mem.allocation, mem.seconds_per_patch(pb), memory_budget is None)


def _fixed_plan(model: OnnxModel, request: Request, g2: int, patch_batch: int, held_bytes: int,
                held_per_image: int) -> Plan:
    """The plan of `patch_batch` patches per call, lean, nothing measured (`g2`: patches per image that make
    calls); refused when its known buffers cannot fit (`check_fits`)."""
    if patch_batch < 1:
        raise PatchgenError(f"patch batch must be >= 1, got {patch_batch}")
    pb = min(patch_batch, request.num_images * g2)  # no call can hold more patches than the images have
    ipr = images_per_run(pb, g2, request.num_images)
    check_fits(model, ipr, pb, held_bytes + ipr * held_per_image, edit=request.edit)
    return Plan(request, pb, ipr)


def _beyond_reach(minimum: float, budget: int, limited_by: str) -> PatchgenError:
    """The refusal of a run whose `minimum` (bytes) is above the `budget` this process can have at most."""
    return PatchgenError(f"this model needs a memory budget of at least {format_size(minimum)} (one patch per call), "
                         f"but this process can have only {format_size(budget)} ({limited_by}): free memory or raise "
                         f"the memory limit")


def _smallest_peak_plan(model: OnnxModel, request: Request, minimum: float, budget: int, held_bytes: int) -> Plan:
    """The default `budget` (bytes) is below this model's `minimum` (bytes): one patch per call, lean, with a note."""
    note = (f"this model's minimum budget ({format_size(minimum)}) is above the default "
            f"({format_size(budget)}, {DEFAULT_BUDGET_SHARE:.0%} of what this process can have); running "
            "at the smallest peak, one patch per call")
    model.reopen("lean")
    check_fits(model, 1, 1, held_bytes, edit=request.edit)
    return Plan(request, 1, 1, notes=(note,))


def _planning_budget(model: OnnxModel, memory_budget: Union[None, int, str]) -> tuple[int, str, tuple[str, ...]]:
    """(the budget to plan for in bytes, what capped it or "", notes for the run): `memory_budget` checked
    against the model (`checked_budget`), or when None the default (`memory.default_budget`; UNLIMITED where
    nothing is known about the machine's memory: planned for speed alone)."""
    if memory_budget is None:
        budget, limited_by = memory.default_budget(memory.current_rss())
        return UNLIMITED if budget is None else budget, limited_by, ()
    asked = memory.given_budget(memory_budget)
    budget, limited_by = checked_budget(asked, model.weights_bytes, model.resident_before)
    notes = (f"memory budget {format_size(asked)} is more than this process can have ({format_size(budget)}, "
             f"{limited_by}); planning for {format_size(budget)}",) if limited_by else ()
    return budget, limited_by, notes


def _calibrated(model: OnnxModel, request: Request, budget: int, g2: int, extra) -> tuple[memory.Calibration, int]:
    """(the memory model measured, the patch batch to run) within `budget`, `extra(b)` bytes held beside a call.

    What the planner searches (`session.ALLOCATIONS`, the patch batch) is measured on real calls: one lean
    call of one patch first (`_first_call`); then, on the CPU provider, when the arena's one-patch call is
    predicted to fit, the session is reopened with the arena and its batches probed
    (memory.calibrate_arena); else the lean batches (memory.calibrate). Of the batches measured, the fastest
    per patch that fits is run (memory.fastest_fit), at the fastest thread count measured (`_settle`; unless
    the model was opened with chosen threads). The arena is tried first and alone because it was faster per
    patch at every batch measured (benchmarks/results/session_options.md, budget_speed.md)."""
    # Batches worth running: up to one image's patches, then whole images (5 patches of a 2x2 grid run as 4).
    batches = [b for b in range(1, request.num_images * g2 + 1) if b <= g2 or b % g2 == 0]
    warm_up, run = probe(model, request)
    arena_need = _first_call(model, run, budget, extra)
    if model.provider == "cpu" and arena_need <= budget:
        warm_up()
        model.reopen("arena")
        mem = calibrate_arena(run, budget, batches, extra)
        pb = fastest_fit(mem, budget, extra)
        if pb:
            return _settle(model, run, mem, pb, budget, extra), pb
        model.reopen("lean")  # the arena's one-patch call came out larger than charged: back to the lean session
        mem = calibrate(None, run, budget, batches, extra, timed=True)
    else:
        mem = calibrate(warm_up, run, budget, batches, extra, timed=True)
    return mem, plan_patch_batch(mem, budget, batches, extra)


def _first_call(model: OnnxModel, run, budget: int, extra) -> float:
    """Run one lean call of one patch (its first-use allocations included), so that a budget below the
    warm-up (one image sampled for one step) is refused (BudgetTooSmall) before the warm-up could overrun
    it. Returns the bytes the arena's calibration is predicted to need at least: what the lean one needs, or
    more where the arena's first call, charged ARENA_PRIOR times the lean call (its blocks kept), costs more."""
    lean_call = memory.measure_call(run, 1)
    # The warm-up is charged what calibration will then see: the call's high-water mark, what the warm-up
    # leaves resident beyond it (WARM_UP_SETTLING) and its image arrays, beside what the plan holds; so a
    # rerun at the minimum named here is accepted by the calibrated plan.
    need = memory.peak_rss() + WARM_UP_SETTLING + image_bytes(model) + extra(1)
    if need > budget:
        least = fresh_minimum(need)
        raise BudgetTooSmall(f"memory budget {format_size(budget)} is below this model's minimum of "
                             f"{least / MIB:.1f}M (one patch per call)", least)
    arena = memory.current_rss() + WARM_UP_SETTLING + ARENA_PRIOR * lean_call + image_bytes(model) + extra(1)
    return max(need, arena)


THREAD_BYTES = MIB  # charged per intra-op thread beyond those calibrated, before one is tried (0.3-0.4 MiB measured)


def _settle(model: OnnxModel, run, mem: memory.Calibration, pb: int, budget: int, extra) -> memory.Calibration:
    """After arena calibration chose `pb`: unless the caller chose the threads, time `pb` at each other thread
    count (`thread_candidates`; a count above the calibrated one only when its threads' THREAD_BYTES fit),
    each in a session reopened with it (the old one released first: its arena goes, and the new one grows
    its own to `pb`, no larger than calibration's). On a machine busy with other work fewer threads can be
    faster. Then the fastest is opened afresh, so the arena holds `pb`'s blocks, not the largest
    probe's. Returns `mem` with that speed, the mark reached and the resident size after it."""
    if model.threads_chosen and pb == mem.largest:  # nothing to try, and the arena holds pb's blocks already
        return mem
    calibrated, best = model.threads, (mem.seconds_per_patch(pb), model.threads)
    for threads in () if model.threads_chosen else thread_candidates(available_cpus()):
        if threads == calibrated or mem.peak(pb, extra(pb)) + max(threads - calibrated, 0) * THREAD_BYTES > budget:
            continue
        model.reopen(threads=threads)
        run(pb)  # grows the new session's arena
        best = min(best, (memory.probe_call(run, pb)[1], threads))
    model.reopen(threads=best[1], fresh=True)
    run(pb)
    steady = memory.measure_call(run, pb)
    calls = tuple((b, max(added, steady) if b == pb else added) for b, added in mem.calls)
    seconds = tuple(best[0] if b == pb else s for (b, _), s in zip(mem.calls, mem.seconds))
    return memory.Calibration(memory.peak_rss(), memory.current_rss(), calls, seconds, "arena")


def iter_samples(model: OnnxModel, plan: Plan, callback=None, on_x0=None) -> Iterator[tuple[int, np.ndarray]]:
    """(image index, uint8 [H, W, C]) for each image, a run of `plan.images_per_run` images at a time.

    callback(step index, t) is called after every sampler step of every run; on_x0(index of the run's first
    image, step index, x0_hat [n, C, H, W] in [-1, 1]) too, with the step's estimate of the run's images (a
    preview; read only). An edit's kept pixels come out as its input's 8-bit values exactly."""
    r, edit = plan.request, plan.request.edit
    for first in range(0, r.num_images, plan.images_per_run):
        n = min(plan.images_per_run, r.num_images - first)
        x = sample_images(model, model.spec, num_images=n, seed=r.seed, steps=r.steps, sampler=r.sampler,
                          eta=r.eta, patch_batch=plan.patch_batch, first_index=first, callback=callback,
                          init=None if edit is None else edit.init, keep=None if edit is None else edit.keep,
                          strength=1.0 if edit is None else edit.strength, jumps=0 if edit is None else edit.jumps,
                          on_x0=None if on_x0 is None else functools.partial(on_x0, first))
        for k, image in enumerate(to_uint8(x)):
            yield first + k, image


def generate(model: Union[str, OnnxModel, None] = None, num_images: int = 1, seed: int = 0,
             steps: Optional[int] = None, sampler: Optional[str] = None, memory_budget: Union[None, int, str] = None,
             patch_batch: Optional[int] = None, eta: Optional[float] = None,
             threads: Optional[int] = None, provider: str = DEFAULT_PROVIDER, *,
             init_image: Optional[ImageInput] = None, mask: Optional[ImageInput] = None,
             strength: Optional[float] = None, outpaint: Optional[str] = None, repaint_jumps: int = 0) -> np.ndarray:
    """uint8 images [N, H, W, C] from an .onnx path, a shipped model's name (`faces64_2x2`; None: the
    default) or a loaded OnnxModel. Image i depends only on (model, seed, i, sampler, steps, eta, the edit).
    sampler None: dpm++ (20 steps), or ddim (50) with eta or repaint_jumps (`loop.default_sampler`).
    threads and provider apply when the model is opened here (see `load_model`). memory_budget bounds
    the host's peak RSS, not a GPU's memory: None, the default budget; "min", the smallest peak
    (`make_plan`).

    Editing (`edit.make_edit`; paths, or uint8 arrays at the model's size): init_image alone is img2img
    (SDEdit) at `strength` (default 0.75: the last floor(steps x strength) steps run); with mask (white =
    paint, black = keep) it is inpainting, every step by default; outpaint "right:1" (left, up, down) moves
    the image by whole patches and paints the freed ones; repaint_jumps adds RePaint's resampling to either
    (ddim, ddpm). Kept pixels are the input's exactly; a patch with every pixel kept makes no network call.
    PatchgenError for input that cannot be used."""
    if not isinstance(model, OnnxModel):
        model = load_model(model, threads, provider, memory_budget)
    edit, _ = make_edit(model.spec, init_image, mask, strength, outpaint, repaint_jumps,
                        memory.given_budget(memory_budget))
    plan = make_plan(model, num_images, seed, sampler, steps, eta, memory_budget=memory_budget,
                     patch_batch=patch_batch, edit=edit)
    return np.stack([img for _, img in iter_samples(model, plan)])


# The sampler names AUTOMATIC1111's web UI and stable-diffusion.cpp write in their `parameters` text.
A1111_SAMPLERS = {"ddim": "DDIM", "ddpm": "DDPM", "dpm++": "DPM++ 2M"}


def png_text(model: OnnxModel, request: Request, index: int) -> dict[str, str]:
    """What was run, stored in each PNG's text chunks: the model's hash, seed, index, sampler and steps, and
    eta only for the sampler that has one, the edit's kind and strength where there is one; and the same in
    one `parameters` chunk as AUTOMATIC1111's web UI writes it (`a1111_parameters`). index -1: a grid of all
    images."""
    text = {"patchgen:model_sha256": model.sha256, "patchgen:model_file": model.path.name,
            "patchgen:seed": str(request.seed), "patchgen:index": str(index), "patchgen:sampler": request.sampler,
            "patchgen:steps": str(request.steps)}
    if request.eta is not None:
        text["patchgen:eta"] = repr(request.eta)
    if request.edit is not None:
        text["patchgen:edit"] = request.edit.kind
        text["patchgen:strength"] = repr(request.edit.strength)
        if request.edit.outpaint:
            text["patchgen:outpaint"] = request.edit.outpaint
        if request.edit.jumps:
            text["patchgen:repaint_jumps"] = str(request.edit.jumps)
    return {**text, "parameters": a1111_parameters(model, request, index), "Software": "patchgen"}


def a1111_parameters(model: OnnxModel, request: Request, index: int) -> str:
    """The generation parameters as one line of `Key: value` pairs, the form of AUTOMATIC1111's web UI
    `parameters` text chunk (no prompt: patchgen's models are unconditional), which web UIs and PNG-info
    readers show: `Steps: 20, Sampler: DPM++ 2M, Seed: 7, Image index: 3, Size: 64x64, Model: faces64_2x2,
    Model hash: 1a2b3c4d5e, ...`. The hash is the first 10 hex digits of the file's SHA-256 (A1111's
    "AutoV2"). Seed and Image index together name the noise: image i of seed s is (s, i), not seed s + i."""
    spec, edit = model.spec, request.edit
    pairs = [("Steps", request.steps), ("Sampler", A1111_SAMPLERS[request.sampler]), ("Seed", request.seed)]
    if index >= 0:
        pairs.append(("Image index", index))
    pairs += [("Size", f"{spec.image_size}x{spec.image_size}"), ("Model", model.path.stem),
              ("Model hash", model.sha256[:10])]
    if request.eta is not None:
        pairs.append(("Eta", f"{request.eta:g}"))
    if edit is not None:
        pairs.append(("Denoising strength", f"{edit.strength:g}"))
        if edit.keep is not None:
            pairs.append(("Mask", "outpaint " + edit.outpaint if edit.outpaint else "yes"))
        if edit.jumps:
            pairs.append(("RePaint jumps", edit.jumps))
    pairs.append(("Version", f"patchgen {_version()}"))
    return ", ".join(f"{k}: {v}" for k, v in pairs)


def _version() -> str:
    try:
        return importlib.metadata.version("patchgen")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
