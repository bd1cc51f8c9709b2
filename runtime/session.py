"""The one place that opens onnxruntime sessions and sets their memory behaviour.

Defaults chosen by benchmarks/session_options.py (results/session_options.md; 256x256 4x4 edge model,
2 threads; peak RSS at 1 / 16 patches per call; seconds per step at 1 / 16, fastest of 3):

  onnxruntime defaults (CPU arena, memory pattern), glibc malloc as is   110 / 350 MiB   0.40 / 0.33 s
  arena on, memory pattern off, malloc tuned                             94 / 204 MiB   0.40 / 0.32 s
  arena off, memory pattern on, malloc tuned                             91 / 214 MiB   0.45 / 0.39 s
  arena off, memory pattern off, malloc tuned (patchgen's default)       90 / 196 MiB   0.42 / 0.44 s

The lowest peak costs up to 1.3x the time per step of onnxruntime's defaults (the machine is shared:
another run of the same script had 0.41 against 0.27 s): every call maps fresh pages for its
activations and returns them after. The CPU arena would keep the largest call's blocks reserved, and
the memory planner's fitted line then over-charges (it sees each probe's leftovers), so a budget buys
smaller patch batches. glibc keeps freed blocks in per-thread arenas and on a heap it rarely trims:
one malloc arena and mmap-backed blocks from 64 KiB up make freed activations go back to the kernel,
so the peak is linear in the patch batch. Prepacking off, initializers through the device allocator
and weights as external data each moved the floor by less than 2 MiB.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

import onnxruntime as ort

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


def open_session(model, threads: int = 1) -> ort.InferenceSession:
    """`model`: a path or serialized ONNX bytes. CPU execution provider only."""
    tune_allocator()
    return ort.InferenceSession(model, sess_options=session_options(threads), providers=["CPUExecutionProvider"])
