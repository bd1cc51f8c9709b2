"""The environment variables patchgen reads, each named once here. Constants only, with no imports, so that a
process that must stay small (a benchmark's driver, benchmarks/benchlib.py) can name them without loading
onnxruntime or torch."""

# The root of patchgen's caches: images/ (training's decoded images, models/cache.py) and graphs/ (the sampler's
# optimised graphs, runtime/graph_cache.py). Unset: $XDG_CACHE_HOME/patchgen, else ~/.cache/patchgen.
CACHE_ENV = "PATCHGEN_CACHE_DIR"
# A NotoColorEmoji.ttf outside the system's font folders, for the noto-emoji data sets (models/data.py).
NOTO_FONT_ENV = "PATCHGEN_NOTO_FONT"
# Benchmarks only (benchmarks/session_options.py, precision.py): onnxruntime settings laid over patchgen's in every
# session the process opens (runtime/session.py, `apply_overrides`), a JSON object of SessionOptions attributes
# ({"enable_mem_pattern": true}) and session config entries (keys with a dot: {"session.disable_prepacking": "1"}).
# A run with it set keeps no budget promise.
SESSION_OPTIONS_ENV = "PATCHGEN_SESSION_OPTIONS"
# "0": leave glibc's allocator as it is; anything else or unset: one malloc arena and mmap-backed blocks from
# 64 KiB (runtime/session.py, `tune_allocator`).
MALLOC_TUNING_ENV = "PATCHGEN_MALLOC_TUNING"
