"""The one place that opens onnxruntime sessions and sets their memory behaviour."""
from __future__ import annotations

import onnxruntime as ort


def session_options(threads: int = 1) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # No CPU arena: freed activations go back to the allocator instead of staying reserved at their peak.
    so.enable_cpu_mem_arena = False
    so.log_severity_level = 3  # errors only
    return so


def open_session(model, threads: int = 1) -> ort.InferenceSession:
    """`model`: a path or serialized ONNX bytes. CPU execution provider only."""
    return ort.InferenceSession(model, sess_options=session_options(threads), providers=["CPUExecutionProvider"])
