"""The one place that opens onnxruntime sessions and sets their memory behaviour.

Defaults chosen by benchmarks/session_options.py; its figures (peak RSS and time per step for each
combination of the options below) are in benchmarks/results/session_options.md. onnxruntime's CPU
arena and memory pattern are off: the arena would keep the largest call's blocks reserved, and the
memory planner's fitted line would then over-charge (it sees each probe's leftovers), so a budget would
buy smaller patch batches. The price is time: every call maps fresh pages for its activations and
returns them after. glibc keeps freed blocks in per-thread arenas and on a heap it rarely trims: one
malloc arena and mmap-backed blocks from 64 KiB up make freed activations go back to the kernel, so the
peak is linear in the patch batch. Prepacking, initializers through the device allocator and weights as
external data were measured too and left at onnxruntime's defaults.

Execution providers go by short names, onnxruntime's own without "ExecutionProvider", lower-cased: cpu,
cuda, tensorrt, openvino, xnnpack ... Which ones exist depends on the installed onnxruntime build
(onnxruntime-gpu on a Jetson has cuda and tensorrt). A provider that is not available, or that onnxruntime
could not start (it then quietly runs on the CPU), is an error: a run never falls back without saying so.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import warnings

import onnxruntime as ort

from .errors import PatchgenError

SUFFIX = "ExecutionProvider"
DEFAULT_PROVIDER = "cpu"
NOT_COMPUTE = ("azure",)  # listed as available in the standard builds, but it calls remote endpoints
M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # mallopt parameters, <malloc.h>
MMAP_THRESHOLD = 64 * 1024


@functools.lru_cache(maxsize=1)
def tune_allocator() -> bool:
    """glibc only, once per process, before the first session; PATCHGEN_MALLOC_TUNING=0 turns it off."""
    if os.environ.get("PATCHGEN_MALLOC_TUNING", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): leave the allocator alone
        return False
    return bool(mallopt(M_ARENA_MAX, 1)) and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def session_options(threads: int = 1) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.enable_cpu_mem_arena = False
    so.enable_mem_pattern = False
    so.log_severity_level = 3  # errors only
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


def open_session(model, threads: int = 1, provider: str = DEFAULT_PROVIDER) -> ort.InferenceSession:
    """`model`: a path or serialized ONNX bytes; `provider`: a short name from `available_providers()`.

    Any other provider is backed by the CPU provider for the nodes it cannot run (onnxruntime's placement).
    Raises PatchgenError when the provider is unavailable or did not start."""
    tune_allocator()
    chosen = provider_name(provider)
    providers = [chosen] + (["CPUExecutionProvider"] if chosen != "CPUExecutionProvider" else [])
    with warnings.catch_warnings():  # a provider it cannot start is reported below, as an error
        warnings.simplefilter("ignore", UserWarning)
        session = ort.InferenceSession(model, sess_options=session_options(threads), providers=providers)
    if chosen not in session.get_providers():  # onnxruntime falls back to the CPU with only a log line
        raise PatchgenError(f"onnxruntime could not start the {short_name(chosen)} provider (missing driver or "
                            f"libraries?); the session runs only on {', '.join(map(short_name, session.get_providers()))}. "
                            f"Pass --provider cpu to run on the CPU")
    return session
