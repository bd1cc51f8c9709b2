"""Checkpoint -> single-patch ONNX denoiser."""
