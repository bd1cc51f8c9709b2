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
