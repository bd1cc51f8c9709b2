"""Every benchmark script runs end to end at a tiny size, so the scripts cannot rot (no timing is checked)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).parent.parent / "benchmarks"

TINY = {
    "budget_sweep.py": ["--image-size", "16", "--grid", "2", "--points", "2", "--steps", "1"],
    "session_options.py": ["--image-size", "16", "--grid", "2", "--steps", "1", "--repeats", "1"],
    "memory_vs_grid.py": ["--sizes", "16", "--grids", "1,2", "--no-paper", "--steps", "1"],
    "vs_pytorch.py": ["--image-size", "16", "--grids", "2", "--steps", "1", "--repeats", "1"],
    "threads.py": ["--image-size", "16", "--grids", "2", "--steps", "1", "--repeats", "1", "--threads", "1"],
    "train_throughput.py": ["--image-size", "16", "--grids", "1,2", "--steps", "1", "--warmup", "0", "--batch-size", "2",
                            "--precisions", "fp32,bf16"],
}


@pytest.mark.parametrize("script", sorted(TINY))
def test_benchmark_runs_tiny(script, tmp_path):
    out = tmp_path / "result"
    r = subprocess.run([sys.executable, str(BENCH / script), *TINY[script], "--out", str(out)], capture_output=True,
                       text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert rows and out.with_suffix(".md").read_text().count("|") > 4


def test_quality_tiny(tmp_path):
    from patchgen.export.onnx_export import export_onnx

    from conftest import tiny_config, write_checkpoint

    model = tmp_path / "m.onnx"
    faces = {"name": "twemoji-faces", "holdout_fraction": 0.1, "holdout_seed": 0, "num_train": 113}
    export_onnx(write_checkpoint(tmp_path / "c.pt", tiny_config(), data=faces), model)
    out = tmp_path / "quality"
    r = subprocess.run([sys.executable, str(BENCH / "quality.py"), "--models", str(model), "--samplers", "ddim:2",
                        "--num-samples", "4", "--chunk", "2", "--cache", str(tmp_path / "cache"), "--real", "all",
                        "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    (row,) = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert row["n"] == 4 and row["fid"] > 0 and row["seam_real"] > 0
    assert (tmp_path / "quality_samples.png").exists()
    (real,) = (tmp_path / "cache").glob("real_twemoji-faces_*_all.npz")  # the model's own data set, all of it
    assert len(np.load(real)["images"]) == 125


def test_levers_table(tmp_path):
    run = tmp_path / "runs" / "x0"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"prediction": "x0", "gcc_source": "xt", "global_context": 4}))
    (run / "eval_log.csv").write_text("step,seam,seam_real,swap_increase_0_300,swap_increase_300_700,"
                                      "swap_increase_700_1000,mse_true_gcc_700_1000\n500,2.5,0.8,0.03,0.02,0.004,0.48\n")
    out = tmp_path / "levers"
    r = subprocess.run([sys.executable, str(BENCH / "levers.py"), str(run), "--out", str(out)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert row["prediction"] == "x0" and row["seam"] == 2.5 and row["step"] == 500


def test_every_benchmark_is_smoke_tested():
    scripts = {p.name for p in BENCH.glob("*.py") if p.name != "benchlib.py"}
    assert scripts <= set(TINY) | {"quality.py", "levers.py"}, scripts - set(TINY)


@pytest.mark.parametrize("script", sorted(TINY) + ["quality.py", "levers.py"])
def test_benchmark_help(script):
    r = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Example" in r.stdout
