"""Every benchmark script runs end to end at a tiny size, so the scripts cannot rot (no timing is checked)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "benchmarks"

TINY = {
    "budget_sweep.py": ["--image-size", "16", "--grid", "2", "--points", "2", "--steps", "1"],
    "session_options.py": ["--image-size", "16", "--grid", "2", "--steps", "1", "--repeats", "1"],
    "memory_vs_grid.py": ["--sizes", "16", "--grids", "1,2", "--no-paper", "--steps", "1"],
    "vs_pytorch.py": ["--image-size", "16", "--grids", "2", "--steps", "1", "--repeats", "1"],
    "threads.py": ["--image-size", "16", "--grids", "2", "--steps", "1", "--repeats", "1", "--threads", "1"],
    "train_throughput.py": ["--image-size", "16", "--grids", "1,2", "--steps", "1", "--warmup", "0", "--batch-size", "2"],
}


@pytest.mark.parametrize("script", sorted(TINY))
def test_benchmark_runs_tiny(script, tmp_path):
    out = tmp_path / "result"
    r = subprocess.run([sys.executable, str(BENCH / script), *TINY[script], "--out", str(out)], capture_output=True,
                       text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert rows and out.with_suffix(".md").read_text().count("|") > 4


def test_every_benchmark_is_smoke_tested():
    scripts = {p.name for p in BENCH.glob("*.py") if p.name != "benchlib.py"}
    assert scripts <= set(TINY) | {"quality.py"}, scripts - set(TINY)


@pytest.mark.parametrize("script", sorted(TINY))
def test_benchmark_help(script):
    r = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Example" in r.stdout
