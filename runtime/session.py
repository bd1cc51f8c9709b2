"""The one place that opens onnxruntime sessions and sets their memory behaviour.

Defaults chosen by benchmarks/session_options.py (results/session_options.md; 256x256 4x4 edge model,
2 threads, peak RSS at 1 / 16 patches per call, seconds per step at 1 patch per call):

  onnxruntime defaults (CPU arena, memory pattern), glibc malloc as is   110 / 349 MiB   0.27 s
  arena on, memory pattern off, malloc tuned                             93 / 204 MiB   0.27 s
  arena off, memory pattern on, malloc tuned                             92 / 214 MiB   0.33 s
  arena off, memory pattern off, malloc tuned (patchgen's default)       90 / 196 MiB   0.41 s

The lowest peak costs about 1.5x the time per step of onnxruntime's defaults: every call maps fresh
pages for its activations and returns them after. The CPU arena would keep the largest call's blocks
reserved; with it the memory planner's fitted line over-charges (it sees each probe's leftovers), so a
budget buys smaller patch batches. glibc keeps freed blocks in per-thread arenas and on a heap it
rarely trims: one malloc arena and mmap-backed blocks from 64 KiB up make freed activations go back to
the kernel, so the peak is linear in the patch batch. Prepacking off, initializers through the device
allocator and weights as external data each moved the floor by less than 2 MiB.
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
