"""The one place that opens onnxruntime sessions and sets their memory behaviour.

Allocation. Two option sets, chosen per run by the planner (generate.make_plan, memory.calibrate_arena):
"lean" turns onnxruntime's CPU arena and memory pattern off, so every call maps fresh pages for its
activations and returns them after, and the peak is linear in the patch batch; "arena" turns the arena on,
which keeps the largest call's blocks for the next call: no page faults per call (1.4-2.0x faster per
image for fp32 models and 1.8x for int8 on x86: benchmarks/results/budget_speed.md), at the price of
holding those blocks between calls, which the planner measures and charges. The memory pattern stays
off in both (it adds memory for no measured speed: benchmarks/results/session_options.md). glibc keeps
freed blocks in per-thread arenas and on a heap it rarely trims: one malloc arena and mmap-backed blocks
from 64 KiB up make freed activations go back to the kernel (`tune_allocator`, process-wide, in both
modes). Prepacking and initializers through the device
allocator were measured too and left at onnxruntime's defaults.

Graph optimisation. onnxruntime's default level (ORT_ENABLE_ALL) includes an x86 layout pass (NCHWc) that
holds a reordered copy of every Conv weight beside the original while the session opens: the peak is then
about twice the weights. `graph_cache.py` therefore optimises a model once per device into a cached graph
with its weights as page-aligned external data, and opens that with optimisation off ("none"), so that the
weights are memory-mapped, held once. "extended" is the level without the layout pass, for a model opened
without the cache.

Execution providers go by short names, onnxruntime's own without "ExecutionProvider", lower-cased: cpu,
cuda, tensorrt, openvino, xnnpack ... Which ones exist depends on the installed onnxruntime build
(onnxruntime-gpu on a Jetson has cuda and tensorrt). A provider that is not available, or that onnxruntime
could not start (it then quietly runs on the CPU), is an error: a run never falls back without saying so.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import os
import warnings
from pathlib import Path
from typing import Optional

import onnxruntime as ort

from .environment import MALLOC_TUNING_ENV, SESSION_OPTIONS_ENV
from .errors import ArgumentError, PatchgenError

SUFFIX = "ExecutionProvider"
DEFAULT_PROVIDER = "cpu"
NOT_COMPUTE = ("azure",)  # listed as available in the standard builds, but it calls remote endpoints
M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # mallopt parameters, <malloc.h>
MMAP_THRESHOLD = 64 * 1024
EXTERNAL_MIN_BYTES = 1024  # initializers from this size up go to an optimised graph's external data
# How a session allocates its activations: "lean" (arena off: every call maps fresh pages and returns them, so
# the peak is the call's own) or "arena" (onnxruntime's CPU arena keeps the largest call's blocks for the
# next call: no page faults per call, at the price of holding them between calls). The memory pattern stays
# off in both: it pre-plans one block per input shape, more memory for no measured speed
# (benchmarks/results/session_options.md). The planner (generate.make_plan) chooses between them.
ALLOCATIONS = ("lean", "arena")
OPTIMIZATION = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}


@functools.lru_cache(maxsize=1)
def tune_allocator() -> bool:
    """glibc only, once per process, before the first session; PATCHGEN_MALLOC_TUNING=0 turns it off."""
    if os.environ.get(MALLOC_TUNING_ENV, "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): leave the allocator alone
        return False
    return bool(mallopt(M_ARENA_MAX, 1)) and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def session_options(threads: int = 1, optimization: str = "all", allocation: str = "lean",
                    overrides: Optional[dict] = None) -> ort.SessionOptions:
    """patchgen's session options. optimization: a key of OPTIMIZATION (graph optimisation level);
    allocation: one of ALLOCATIONS ("lean": arena off, memory-first; "arena": onnxruntime's CPU arena on);
    overrides: onnxruntime settings laid over these (`apply_overrides`; None: those of $PATCHGEN_SESSION_OPTIONS)."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    so = ort.SessionOptions()
    so.graph_optimization_level = OPTIMIZATION[optimization]
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.enable_cpu_mem_arena = allocation == "arena"
    so.enable_mem_pattern = False
    so.log_severity_level = 3  # errors only
    return apply_overrides(so, overrides)


def apply_overrides(so: ort.SessionOptions, overrides: Optional[dict] = None) -> ort.SessionOptions:
    """`so` with `overrides` set on it: a key with a dot is a session config entry (its value as text), any other
    a SessionOptions attribute. None: the JSON object in $PATCHGEN_SESSION_OPTIONS (SESSION_OPTIONS_ENV), if set.
    PatchgenError for text that is not a JSON object, or a key that is neither."""
    if overrides is None:
        try:
            overrides = json.loads(os.environ.get(SESSION_OPTIONS_ENV) or "{}")
        except ValueError as e:
            raise PatchgenError(f"{SESSION_OPTIONS_ENV} is not JSON: {e}") from None
    if not isinstance(overrides, dict):
        raise PatchgenError(f"{SESSION_OPTIONS_ENV} must be a JSON object of onnxruntime settings, "
                            f"got {overrides!r}")
    for key, value in overrides.items():
        if "." in key:
            so.add_session_config_entry(key, str(value))
        elif hasattr(so, key) and not key.startswith("_") and not callable(getattr(so, key)):
            setattr(so, key, value)
        else:
            raise PatchgenError(f"{SESSION_OPTIONS_ENV}: {key!r} is neither an onnxruntime SessionOptions attribute "
                                "nor a session config entry (a name with a dot)")
    return so


def short_name(provider: str) -> str:
    """onnxruntime's provider name -> patchgen's: "CUDAExecutionProvider" -> "cuda"."""
    return provider.removesuffix(SUFFIX).lower()


def available_providers() -> list[str]:
    """Short names of the providers this onnxruntime build can run, in onnxruntime's order of preference."""
    return [n for n in map(short_name, ort.get_available_providers()) if n not in NOT_COMPUTE]


def provider_name(name: str) -> str:
    """A short name (any case) -> onnxruntime's provider name, or a PatchgenError listing what is available."""
    known = {short_name(p): p for p in ort.get_all_providers()}
    available = available_providers()
    key = name.strip().lower()
    if key not in available:
        why = ("is not available in this onnxruntime build" if key in known
               else "is not an onnxruntime execution provider")
        raise PatchgenError(f"provider {name!r} {why} (onnxruntime {ort.__version__}); available: "
                            f"{', '.join(available)}" + ("; GPU providers come with onnxruntime-gpu"
                                                         if key in ("cuda", "tensorrt") else ""))
    return known[key]


def check_openable(path) -> None:
    """onnxruntime takes paths as UTF-8 text: a path that is not (a folder named in another encoding, which
    Python holds as surrogate escapes) is one PatchgenError line, not onnxruntime's constructor error."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        shown = str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise PatchgenError(f"onnxruntime cannot open {shown}: the path is not valid UTF-8; rename the folder or "
                            "choose another") from None


def open_session(path, threads: int = 1, provider: str = DEFAULT_PROVIDER, optimization: str = "all",
                 save_optimized: Optional[Path] = None, allocation: str = "lean") -> ort.InferenceSession:
    """Open the ONNX file at `path` (never bytes: onnxruntime would hold them beside the parsed weights).

    provider: a short name from `available_providers()`; any other provider is backed by the CPU provider for
    the nodes it cannot run (onnxruntime's placement). optimization: a key of OPTIMIZATION. allocation: one
    of ALLOCATIONS (`session_options`). save_optimized:
    also write the optimised graph there, its initializers from 1 KiB up as external data in
    `<name>.data` beside it at page-aligned offsets (onnxruntime's writer aligns them), which a later open
    memory-maps. Raises PatchgenError when the provider is unavailable or did not start."""
    if isinstance(path, (bytes, bytearray)):
        raise TypeError("open_session takes a path; write the model to a file first")
    check_openable(path)
    tune_allocator()
    chosen = provider_name(provider)
    providers = [chosen] + (["CPUExecutionProvider"] if chosen != "CPUExecutionProvider" else [])
    options = session_options(threads, optimization, allocation)
    if save_optimized is not None:
        options.optimized_model_filepath = str(save_optimized)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         Path(save_optimized).name + ".data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                         str(EXTERNAL_MIN_BYTES))
    with warnings.catch_warnings():  # a provider it cannot start is reported below, as an error
        warnings.simplefilter("ignore", UserWarning)
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    if chosen not in session.get_providers():  # onnxruntime falls back to the CPU with only a log line
        running = ", ".join(map(short_name, session.get_providers()))
        raise ArgumentError(f"onnxruntime could not start the {short_name(chosen)} provider (missing driver or "
                            f"libraries?); the session runs only on {running}. ",
                            "Pass {provider} to run on the CPU", provider=DEFAULT_PROVIDER)
    return session
