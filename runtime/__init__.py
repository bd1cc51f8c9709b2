"""patchgen's edge runtime: numpy + onnxruntime only, never torch."""
