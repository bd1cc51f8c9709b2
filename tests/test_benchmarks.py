"""Every benchmark script runs end to end at a tiny size, so the scripts cannot rot (no timing is checked);
the quality metrics are pinned to known answers."""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from patchgen.models.data import DataSource, holdout_split
from patchgen.models.metrics import frechet_distance, kid, paired_kid_ratio

BENCH = Path(__file__).parent.parent / "benchmarks"
# Smoke runs get tiny inputs, and a timeout of at least 10x the CPU seconds the run takes on the 2-core machine
# (an upper bound on its quiet time): a loaded CI machine, 4-5x slower, cannot trip it.

TINY = {
    "budget_sweep.py": ["--image-size", "16", "--grid", "2", "--points", "2", "--steps", "1", "--repeats", "1"],
    "session_options.py": ["--image-size", "16", "--grid", "2", "--steps", "1", "--repeats", "1"],
    "model_scale.py": ["--widths", "32", "--sizes", "16", "--grids", "1,2", "--int8", "2", "--rounds", "1",
                       "--steps", "1", "--threads", "1", "--work", "work"],
    "memory_vs_grid.py": ["--sizes", "16", "--grids", "1,2", "--halos", "0,2", "--no-paper", "--steps", "1"],
    "vs_pytorch.py": ["--image-size", "16", "--grids", "2", "--steps", "1", "--repeats", "1", "--halo", "2"],
    "budget_speed.py": ["--models", "faces64_2x2", "--no-edge", "--no-quick-start", "--rounds", "1", "--steps", "1",
                        "--num-images", "1"],
    "editing.py": ["--models", "faces64_2x2", "--rounds", "1", "--steps", "1", "--num-images", "1"],
    "threads.py": ["--image-size", "16", "--grids", "2", "--steps", "1", "--repeats", "1", "--threads", "1"],
    "precision.py": ["--edge-size", "16", "--edge-grid", "2", "--weights", "fp32,int8", "--rounds", "1", "--steps", "1",
                     "--threads", "1"],
    "train_throughput.py": ["--image-size", "16", "--grids", "1,2", "--steps", "1", "--warmup", "0",
                            "--batch-size", "2", "--precisions", "fp32,bf16"],
    "train_threads.py": ["--image-size", "16", "--steps", "2", "--warmup", "0", "--rounds", "1", "--load-procs", "1"],
    "recipe.py": ["--runs", "runs", "--image-size", "16", "--steps", "2", "--preview-every", "2", "--num-samples", "4",
                  "--base-width", "8", "--sampler", "ddim:2"],
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
    """Two models side by side: a 2x2 and its 1x1 baseline, sampled by two workers, metrics against the held-out
    split, the peak ratio, the budget; tiny models, 4 samples, 1 round."""
    from patchgen.export.onnx_export import export_onnx

    from conftest import tiny_config, write_checkpoint

    faces = DataSource("twemoji-faces", holdout_fraction=0.1, holdout_seed=0, num_train=113)
    models = [tmp_path / "m.onnx", tmp_path / "base.onnx"]
    for path, config in zip(models, [tiny_config(), tiny_config(grid=1, use_position=False, use_gcc=False)]):
        export_onnx(write_checkpoint(tmp_path / "c.pt", config, data=faces), path)
    out = tmp_path / "quality"
    r = subprocess.run([sys.executable, str(BENCH / "quality.py"), "--models", ",".join(map(str, models)),
                        "--samplers", "ddim:2", "--num-samples", "4", "--chunk", "2",
                        "--cache", str(tmp_path / "cache"), "--real", "heldout", "--repeats", "1", "--budget-minimum",
                        "--workers", "2", "--out", str(out)], capture_output=True, text=True, timeout=620)
    assert r.returncode == 0, r.stderr[-3000:]
    patches, base = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert patches["n"] == 4 and patches["fd_effnet"] > 0 and patches["seam_real"] > 0 and "fid" not in patches
    assert patches["seam_at"] == base["seam_at"] == "2x2"  # the 1x1 scored at the patch model's borders
    assert re.fullmatch(r"[\d.]+ \([\d.]+-[\d.]+\)", patches["peak_vs_1x1"]) and "peak_vs_1x1" not in base
    for row in (patches, base):
        assert row["budget_mib"] > 1 and row["budget_peak_mib"] > 0 and row["budget_s_per_image"] is not None
        assert row["within_budget"] is True  # the budget's promise, at its own minimum
    assert "| FD-EffNet |" in out.with_suffix(".md").read_text()
    assert (tmp_path / "quality_samples.png").exists()
    assert len(list((tmp_path / "cache").glob("*_ddim2_s0_*_2.npz"))) == 4  # 2 chunks per model, two workers
    assert not list((tmp_path / "cache").glob("*.tmp.npz"))
    (real,) = (tmp_path / "cache").glob("real_twemoji-faces_*_heldout.npz")  # the model's own held-out split
    assert len(np.load(real)["images"]) == len(holdout_split(125, 0.1, 0)[1])


def test_halo_study_tiny(tmp_path):
    """benchmarks/halo.py on a study folder as train_halo.sh leaves it: one group, a 1x1 run and a halo run; tiny
    models, 4 samples of 2 steps against the held-out images, 1 timed round."""
    from patchgen.models.checkpoint import load_checkpoint

    from conftest import tiny_config, write_checkpoint

    faces = DataSource("twemoji-faces", holdout_fraction=0.1, holdout_seed=0, num_train=113)
    for name, config in {"full": tiny_config(grid=1, use_position=False, use_gcc=False),
                         "halo2": tiny_config(halo=2, edge_mask=True)}.items():
        run = tmp_path / "runs" / "g1" / name
        run.mkdir(parents=True)
        write_checkpoint(run / "checkpoint.pt", config, step=2, data=faces)
        cfg = load_checkpoint(run / "checkpoint.pt")["model_config"].to_dict()
        (run / "config.json").write_text(json.dumps({**cfg, "batch_size": 4}))
        (run / "train_log.csv").write_text("step,loss,lr,images_per_s\n1,0.5,1e-4,8.0\n2,0.4,1e-4,8.0\n")
    out = tmp_path / "halo"
    r = subprocess.run([sys.executable, str(BENCH / "halo.py"), "--runs", str(tmp_path / "runs"), "--num-samples", "4",
                        "--sampler", "ddim:2", "--repeats", "1", "--real", "heldout",
                        "--cache", str(tmp_path / "cache"), "--out", str(out)],
                       capture_output=True, text=True, timeout=480)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(row["run"], row["halo_px"], row["edge_mask"]) for row in rows] == [("full", 0, "no"), ("halo2", 2, "yes")]
    assert rows[0]["kid_vs_full"] == 1.0 and rows[1]["train_s"] == 1.0 and rows[1]["steps"] == 2
    assert (tmp_path / "halo_samples.png").exists()


@pytest.fixture
def quality(monkeypatch):
    """benchmarks/quality.py as a module (it imports benchlib from its own folder)."""
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("quality", BENCH / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def exact_gaussian_set(mean, cov, n=16):
    """n points whose sample mean and sample covariance (ddof 1, as np.cov) are exactly `mean` and `cov`:
    mean + Z L^T, with L L^T = cov and Z the zero-mean, orthogonal columns of a Hadamard matrix scaled so
    that Z^T Z = (n - 1) I."""
    h = np.ones((1, 1))
    while len(h) < n:
        h = np.block([[h, h], [h, -h]])  # Sylvester: columns orthogonal; all but the first sum to 0
    d = len(mean)
    z = h[:, 1:d + 1] * np.sqrt((n - 1) / n)
    return mean + z @ np.linalg.cholesky(cov).T


def test_frechet_distance_of_a_set_to_itself_is_zero():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 32)) * rng.uniform(0.1, 3, 32) + rng.normal(0, 5, 32)
    assert abs(frechet_distance(a, a)) < 1e-9
    # Fewer samples than dimensions, as in the benchmark (1000 x 1280): the square roots of the rounding-level
    # eigenvalues of the null space leave ~1e-8 of the total variance.
    a = rng.standard_normal((50, 64)) * rng.uniform(0.1, 3, 64) + rng.normal(0, 5, 64)
    assert abs(frechet_distance(a, a)) < 1e-6 * np.trace(np.cov(a, rowvar=False))


def test_frechet_distance_of_diagonal_gaussians():
    """Diagonal covariances: ||mu_a - mu_b||^2 + sum_i (sqrt(s_a,i) - sqrt(s_b,i))^2; a rotation of both sets
    (non-diagonal covariances) leaves it unchanged."""
    rng = np.random.default_rng(1)
    d = 10
    mu_a, mu_b = rng.normal(0, 1, d), rng.normal(0, 1, d)
    s_a, s_b = rng.uniform(0.2, 4, d), rng.uniform(0.2, 4, d)
    a, b = exact_gaussian_set(mu_a, np.diag(s_a)), exact_gaussian_set(mu_b, np.diag(s_b))
    expected = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(s_a) - np.sqrt(s_b)) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    assert frechet_distance(a @ q, b @ q) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_of_non_commuting_2d_gaussians():
    """In 2-D, Tr M^(1/2) = sqrt(Tr M + 2 sqrt(det M)) for M = S_a S_b (positive eigenvalues), so the
    distance has a closed form even when S_a S_b != S_b S_a."""
    s_a, s_b = np.array([[2.0, 0.6], [0.6, 1.0]]), np.array([[0.5, -0.3], [-0.3, 3.0]])
    mu_a, mu_b = np.array([1.0, -2.0]), np.array([0.5, 0.5])
    m = s_a @ s_b
    expected = (((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b)
                - 2 * np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m))))
    a, b = exact_gaussian_set(mu_a, s_a), exact_gaussian_set(mu_b, s_b)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


@pytest.mark.quick
def test_kid_known_answers():
    # d = 1, k(x, y) = (x y + 1)^3: within a {0, 1}: k(0, 1) = 1; within b {1, 2}: k(1, 2) = 27;
    # across: k(0, 1), k(0, 2), k(1, 1), k(1, 2) = 1, 1, 8, 27, mean 9.25. MMD^2 = 1 + 27 - 2 * 9.25.
    assert kid(np.array([[0.0], [1.0]]), np.array([[1.0], [2.0]])) == pytest.approx(9.5, rel=1e-12)
    # A set against itself: the unbiased estimate is -(2/m) (mean k(x_i, x_i) - mean_{i != j} k(x_i, x_j)),
    # small and negative, not exactly 0.
    a = np.random.default_rng(2).standard_normal((40, 8))
    k = (a @ a.T / 8 + 1) ** 3
    off = (k.sum() - k.trace()) / (40 * 39)
    assert kid(a, a) == pytest.approx(-(2 / 40) * (k.trace() / 40 - off), rel=1e-9)
    assert kid(a, a + 3) > 0 and kid(a + 3, a) == pytest.approx(kid(a, a + 3), rel=1e-12)



@pytest.mark.quick
def test_paired_kid_ratio_compares_like_with_like():
    rng = np.random.default_rng(3)
    real = rng.standard_normal((60, 8))
    near, far = real[:40] + 0.5, real[:40] + 1.0  # paired rows: the same starting point, moved 0.5 or 1
    median, low, high = paired_kid_ratio(near, near, real)
    assert median == low == high == 1.0
    median, low, high = paired_kid_ratio(far, near, real, rounds=50)
    assert low <= median <= high and low > 1.5  # the farther set is worse in every subset
    with pytest.raises(ValueError, match="at least 4"):
        paired_kid_ratio(near[:3], near[:3], real)


def test_levers_table(tmp_path):
    run = tmp_path / "runs" / "x0"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"prediction": "x0", "gcc_source": "xt", "global_context": 4}))
    (run / "eval_log.csv").write_text("step,seam,seam_real,swap_increase_0_300,swap_increase_300_700,"
                                      "swap_increase_700_1000,mse_true_gcc_700_1000\n"
                                      "500,2.5,0.8,0.03,0.02,0.004,0.48\n")
    out = tmp_path / "levers"
    r = subprocess.run([sys.executable, str(BENCH / "levers.py"), str(run), "--out", str(out)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert row["prediction"] == "x0" and row["seam"] == 2.5 and row["step"] == 500


# An absolute path into one machine's home or work folders, which a fresh clone elsewhere does not have.
MACHINE_PATH = re.compile(r"(^|[^A-Za-z0-9_.])/(home|root|work|mnt|Users)/")


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.sh")))
def test_shell_scripts_parse(script):
    r = subprocess.run(["bash", "-n", str(BENCH / script)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert not MACHINE_PATH.search((BENCH / script).read_text())  # no machine-specific paths


def test_train_levers_runs_the_trainer_it_is_given(tmp_path):
    """With a stand-in trainer that only prints its arguments: every run goes to OUT/<run>, the queue logs
    beside OUT, folders created; a missing trainer is one clear line."""
    fake = tmp_path / "fake-train"
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    out = tmp_path / "fresh" / "levers"
    env = {**os.environ, "PATCHGEN_TRAIN": str(fake), "OUT": str(out), "STEPS": "3"}
    r = subprocess.run(["bash", str(BENCH / "train_levers.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    calls = [line for q in "ab" for line in (out.parent / f"levers_{q}.log").read_text().splitlines()]
    assert len(calls) == 8 and all("--max-steps 3 " in c and f"--out {out}/" in c for c in calls)
    assert out.is_dir() and not list(out.iterdir())  # the folder is for runs only (levers.py reads OUT/*)
    env["PATCHGEN_TRAIN"] = str(tmp_path / "missing-train")
    r = subprocess.run(["bash", str(BENCH / "train_levers.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "missing-train not found" in r.stderr and len(r.stderr.splitlines()) == 1


def test_every_benchmark_is_smoke_tested():
    scripts = {p.name for p in BENCH.glob("*.py") if p.name != "benchlib.py"}
    # arm64_compare.py is the last step of arm64_emulated.sh, run by tests/test_arm64.py
    assert scripts <= set(TINY) | {"quality.py", "levers.py", "halo.py", "arm64_compare.py", "hard_limit.py",
                                   "train_scale.py"}, \
        scripts - set(TINY)


def test_hard_limit_tiny(tmp_path, monkeypatch):
    """Runs where memory cgroups can be made (root, a writable controller); skips elsewhere, saying why."""
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("hard_limit", BENCH / "hard_limit.py")
    hard_limit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hard_limit)
    if hard_limit.why_not():
        pytest.skip(f"hard_limit.py: {hard_limit.why_not()}")
    out = tmp_path / "hl"
    r = subprocess.run([sys.executable, str(BENCH / "hard_limit.py"), "--random", "16/2/8", "--points", "3",
                        "--steps", "1", "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert len(rows) >= 3 and all(row["oom_killed"] == "no" and row["exit"] == 0 for row in rows), rows


@pytest.mark.parametrize("script", sorted(TINY) + ["quality.py", "levers.py", "halo.py", "hard_limit.py",
                                                   "train_scale.py"])
def test_benchmark_help(script):
    r = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Example" in r.stdout


def test_train_halo_runs_the_study(tmp_path):
    """With a stand-in trainer: each group's runs go to OUT/<group>/<run> at the group's size, grid and budget;
    only the halo flags differ within a group; STUDY picks the groups."""
    fake = tmp_path / "fake-train"
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    out = tmp_path / "halo"
    env = {**os.environ, "PATCHGEN_TRAIN": str(fake), "OUT": str(out), "STEPS1": "3", "STEPS2": "4"}
    r = subprocess.run(["bash", str(BENCH / "train_halo.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    calls = {re.search(r"--out (\S+)", c).group(1).removeprefix(f"{out}/"): c
             for q in "ab" for c in (out / f"queue_{q}.log").read_text().splitlines()}
    assert sorted(calls) == ["g1/full", "g1/halo0", "g1/halo2", "g1/halo4", "g1/halo4_mask",
                             "g2/full", "g2/halo0", "g2/halo4"]
    for run, call in calls.items():
        group, name = run.split("/")
        size, steps, batch = ("32", "3", "16") if group == "g1" else ("64", "4", "8")
        assert f"--image-size {size} " in call and f"--max-steps {steps} " in call and f"--batch-size {batch}" in call
        halo = re.search(r"--halo (\d+)", call)
        assert (halo.group(1) if halo else "0") == (name.removeprefix("halo").removesuffix("_mask") if name != "full"
                                                    else "0")
        assert ("--edge-mask" in call) == name.endswith("_mask")
        assert ("--grid 1 " in call) == (name == "full")
    r = subprocess.run(["bash", str(BENCH / "train_halo.sh")],
                       env={**env, "OUT": str(tmp_path / "only2"), "STUDY": "g2", "HALO8": "1", "HALO2": "8"},
                       capture_output=True, text=True, timeout=60)
    logs = "".join((tmp_path / "only2" / f"queue_{q}.log").read_text() for q in "ab")
    assert r.returncode == 0 and "g1/" not in logs and "g2/halo8 " in logs


def test_train_scale_tiny(tmp_path):
    """Both parts: the memory rows (memory, cache build, cache map) and 1 vs 2 ranks (torchrun included); a tiny
    model (base width 8), batch 4."""
    out = tmp_path / "scale"
    r = subprocess.run([sys.executable, str(BENCH / "train_scale.py"), "--sizes", "20", "--steps", "4", "--rounds", "1",
                        "--image-size", "16", "--base-width", "8", "--batch-size", "4",
                        "--work", str(tmp_path / "work"), "--out", str(out)],
                       capture_output=True, text=True, timeout=500, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    memory = json.loads((tmp_path / "scale_memory.json").read_text())["rows"]
    assert [row["mode"] for row in memory] == ["memory (--no-cache)", "cache: build, then map", "cache: map"]
    assert all(row["peak_mib"] > 0 and row["images"] == 20 and len(row["rounds"]) == 1 for row in memory)
    ranks = json.loads((tmp_path / "scale_ranks.json").read_text())["rows"]
    assert [row["round"] for row in ranks] == [1, 1, 1, "median", "median", "median"]
    assert all(row["images_per_s"] > 0 for row in ranks) and ranks[3]["vs_reference"] == 1


def test_train_gpu_script_dry_run_on_cpu(tmp_path):
    """benchmarks/train_gpu.sh on the CPU at a tiny size (16 px, base width 8, 2 steps): both runs train, and
    what comes back is at most 8 files, the slim checkpoints loadable for export."""
    import tinyfont
    from patchgen.models.checkpoint import load_checkpoint, model_from_checkpoint

    font = tmp_path / "Tiny.ttf"
    tinyfont.write_font(font, tinyfont.GLYPHS, tinyfont.LIGATURES)
    out = tmp_path / "out"
    env = {**os.environ, "DEVICE": "cpu", "STEPS": "2", "MINUTES": "8", "SIZE": "16", "HALO": "2", "EVERY": "0",
           "BF16": "", "TRAIN_ARGS": "--base-width 8 --num-res-blocks 1", "OUT": str(out),
           "PATCHGEN_NOTO_FONT": str(font), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", str(BENCH / "train_gpu.sh")], env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "g4: step 2" in r.stdout and "g1: step 2" in r.stdout
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and "g4_export.pt" in files and "g1_train_log.csv" in files, files
    ckpt = load_checkpoint(out / "g4_export.pt")
    assert "optimizer" not in ckpt and ckpt["model_config"].grid == 4 and ckpt["model_config"].halo == 2
    model_from_checkpoint(ckpt)
    run = tmp_path / "resume"  # a slim copy cannot be resumed: one clear line
    run.mkdir()
    (out / "g4_export.pt").rename(run / "checkpoint.pt")
    r = subprocess.run([sys.executable, "-m", "patchgen.cli.train", "--out", str(run), "--resume"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.splitlines() == [
        "Error: the checkpoint has no optimizer state (a slim copy, such as benchmarks/train_gpu.sh returns): "
        "patchgen-export can export it, but a run cannot resume from it"]
