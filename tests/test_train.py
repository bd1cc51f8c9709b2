"""Training: the loss falls, checkpoints round-trip, resume equals an uninterrupted run, bad files fail clearly."""
import csv
import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patchgen.models.checkpoint import load_checkpoint, model_from_checkpoint
from patchgen.models.config import TrainConfig
from patchgen.models.data import DataSource, load_folder
from patchgen.models.evaluation import gcc_probe
from patchgen.models.train import new_state, train
from patchgen.runtime.errors import PatchgenError
from patchgen.runtime.limits import available_cpus
from patchgen.runtime.schedule import Schedule

import tinyfont
from conftest import blob_folder, tiny_config

NO_PREVIEW = dict(preview_every=0, checkpoint_every=1000)


@pytest.mark.parametrize("bf16", [False, True])
def test_loss_falls(tmp_path, blobs16, tiny_train_config, bf16):
    result = train(tmp_path, 60, data=blobs16, config=tiny_config(), train_config=tiny_train_config, bf16=bf16,
                   **NO_PREVIEW)
    losses = np.array(result.losses)
    assert len(losses) == 60
    assert losses[-15:].mean() < 0.7 * losses[:5].mean()
    if bf16:  # mixed precision: same first batch, nearly the same loss; weights stay float32
        fp32 = train(tmp_path / "fp32", 1, data=blobs16, config=tiny_config(), train_config=tiny_train_config,
                     **NO_PREVIEW)
        assert losses[0] == pytest.approx(fp32.losses[0], rel=0.02)
        ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
        assert all(v.dtype == torch.float32 for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("overrides,train_settings", [
    (dict(prediction="v", global_context=2), dict(loss="l2", loss_weighting="min_snr")),
    (dict(prediction="x0", gcc_source="x0"), dict(patches_per_image=2)),
    (dict(grid=1, use_position=False, use_gcc=False), {}),
    (dict(halo=2), {}),
    (dict(halo=4, edge_mask=True, prediction="x0", gcc_source="x0", global_context=2), dict(patches_per_image=2)),
])
def test_levers_train(tmp_path, blobs16, overrides, train_settings):
    result = train(tmp_path, 3, data=blobs16, config=tiny_config(**overrides),
                   train_config=TrainConfig(batch_size=4, **train_settings), **NO_PREVIEW)
    assert all(np.isfinite(result.losses))


def test_checkpoint_round_trip(tmp_path, blobs16, tiny_train_config):
    train(tmp_path, 5, data=blobs16, config=tiny_config(), train_config=tiny_train_config, **NO_PREVIEW)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["step"] == 5 and ckpt["model_config"] == tiny_config()
    assert ckpt["data"].name == "blobs" and ckpt["data"].num_train == 58  # 10% of 64 held out
    net = model_from_checkpoint(ckpt, ema=False)
    again = model_from_checkpoint(load_checkpoint(tmp_path / "checkpoint.pt"), ema=False)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 999])
    pos, gcc = torch.eye(4)[:2], torch.randn(2, 3, 8, 8)
    assert torch.equal(net(x, t, pos, gcc), again(x, t, pos, gcc))


def test_resume_equals_uninterrupted(tmp_path, blobs16):
    config = tiny_config(dropout=0.1, gcc_source="x0")  # dropout and the self-conditioning coin use RNG too
    train_config = TrainConfig(batch_size=4, warmup_steps=3, patches_per_image=3)
    whole = train(tmp_path / "a", 8, data=blobs16, config=config, train_config=train_config, **NO_PREVIEW)
    first = train(tmp_path / "b", 4, data=blobs16, config=config, train_config=train_config, **NO_PREVIEW)
    torch.manual_seed(1234)  # the resumed run must not depend on the process's RNG
    second = train(tmp_path / "b", 8, resume=True, data=blobs16, **NO_PREVIEW)
    assert first.losses + second.losses == whole.losses
    a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    for key in a["ema"]:
        assert torch.equal(a["ema"][key], b["ema"][key]), key


@pytest.mark.quick
def test_preview_is_written(tmp_path, blobs16, tiny_train_config):
    train(tmp_path, 2, data=blobs16, config=tiny_config(), train_config=tiny_train_config, preview_every=2,
          preview_count=4, preview_steps=3)
    img = Image.open(tmp_path / "preview_0000002.png")
    assert img.size == (2 * 18 + 2, 2 * 18 + 2)


def test_new_run_refuses_existing_checkpoint(tmp_path, blobs16, tiny_train_config):
    train(tmp_path, 1, data=blobs16, config=tiny_config(), train_config=tiny_train_config, **NO_PREVIEW)
    with pytest.raises(PatchgenError, match="pass resume=True"):
        train(tmp_path, 1, data=blobs16, config=tiny_config(), train_config=tiny_train_config, **NO_PREVIEW)


def test_corrupt_checkpoints_fail_clearly(tmp_path, blobs16, tiny_train_config):
    train(tmp_path, 1, data=blobs16, config=tiny_config(), train_config=tiny_train_config, **NO_PREVIEW)
    good = (tmp_path / "checkpoint.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(good[: len(good) // 2])
    with pytest.raises(PatchgenError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "truncated.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(PatchgenError, match="not a patchgen checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(PatchgenError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def run_cli(*args, cwd=None, env=None):
    # A deprecated click call in the command itself fails the run.
    return subprocess.run([sys.executable, "-W", "error::DeprecationWarning:__main__", "-m", "patchgen.cli.train",
                           *args], capture_output=True, text=True, cwd=cwd, timeout=300,
                          env=None if env is None else {**os.environ, **env})


@pytest.mark.parametrize("args,message", [
    (["--data", "/no/such/folder"], "does not exist"),
    (["--image-size", "30", "--grid", "4"], "does not divide"),
    (["--grid", "0"], "--grid"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**32)], "--seed"),
    (["--threads", str(available_cpus() + 1)], "--threads"),
    (["--resume"], "does not exist"),
    (["--timesteps", "3"], "use more timesteps"),  # cosine, T = 3: 1.6 % of the image left at t = T-1
    (["--schedule", "linear", "--timesteps", "10"], "betas outside"),  # beta_end = 20 / T = 2
    (["--halo", "3"], "window 38 (patch 32 + 2 x halo 3) is not divisible by 4, which 3 U-Net levels need; "
                      "use halo 2 or 4"),
    (["--image-size", "32", "--halo", "1", "--channel-mults", "1,2,2,2"], "use halo 0 or 4"),
    (["--grid", "1", "--halo", "2"], "no neighbouring patches"),
    (["--edge-mask", "--halo", "0"], "needs a halo"),
    (["--no-gcc", "--global-context", "4"], "--global-context is computed from the GCC input"),  # option names
    (["--image-size", "20", "--channel-mults", "1,2,2"], "use fewer --channel-mults"),
    (["--no-cache", "--cache-dir", "somewhere"], "--cache-dir and --no-cache contradict each other"),
    (["--accept-changed-data"], "--accept-changed-data applies to --resume only"),
    (["--dropout", "1"], "--dropout"),
    (["--timesteps", str(10**9)], "--timesteps"),
    (["--batch-size", str(10**9)], "--batch-size"),
    (["--base-width", str(10**6)], "--base-width"),
])
def test_cli_bad_input(tmp_path, args, message):
    r = run_cli(*args, "--out", str(tmp_path / "run"))
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr and "training" not in r.stderr
    assert len(r.stderr.strip().splitlines()[-1]) > 0
    assert not (tmp_path / "run").exists()  # nothing created


def test_cli_trains_on_noto_emoji_from_the_font(tmp_path):
    """--data noto-emoji reads the font's bitmaps (here tests/tinyfont.py's, through $PATCHGEN_NOTO_FONT); the
    checkpoint records the data set's name, licence and attribution. A missing font is an error line, exit 2."""
    font = tmp_path / "Tiny.ttf"
    tinyfont.write_font(font, tinyfont.GLYPHS, tinyfont.LIGATURES)
    args = ["--image-size", "16", "--grid", "2", "--base-width", "8", "--max-steps", "2", "--batch-size", "2",
            "--holdout", "0", "--preview-every", "0", "--data", "noto-emoji"]
    r = run_cli(*args, "--out", str(tmp_path / "run"), env={"PATCHGEN_NOTO_FONT": str(font)})
    assert r.returncode == 0, r.stderr
    data = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["data"]
    assert data.name == "noto-emoji" and data.license == "Apache-2.0 AND OFL-1.1" and data.num_train == 4
    assert "Noto Color Emoji" in data.attribution
    r = run_cli(*args, "--out", str(tmp_path / "other"), env={"PATCHGEN_NOTO_FONT": str(tmp_path / "none.ttf")})
    assert r.returncode == 2 and "PATCHGEN_NOTO_FONT" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("Error: PATCHGEN_NOTO_FONT=")  # after "loading ..."
    assert not (tmp_path / "other").exists()


def test_cli_checks_the_run_folder_first(tmp_path, blobs16, tiny_train_config):
    """The run folder is checked before the data set loads and before the progress bar shows."""
    train(tmp_path, 1, data=blobs16, config=tiny_config(), train_config=tiny_train_config, **NO_PREVIEW)
    r = run_cli("--data", str(tmp_path / "no-such-folder"), "--out", str(tmp_path))
    assert r.returncode == 2 and r.stderr.splitlines() == [f"Error: {tmp_path / 'checkpoint.pt'} already exists: "
                                                           "pass --resume to continue it or choose a new --out"]


def test_cli_resume_non_patchgen_checkpoint(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "checkpoint.pt")
    r = run_cli("--out", str(tmp_path), "--resume")
    assert r.returncode == 2 and "not a patchgen checkpoint" in r.stderr and "Traceback" not in r.stderr
    assert "training" not in r.stderr  # no progress label before the error


def files_of(folder: Path) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def logged_steps(path: Path) -> list:
    with open(path, newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f)]


SMALL_PREVIEWS = dict(preview_every=5, preview_count=2, preview_steps=2)


def test_resume_with_nothing_to_do_changes_nothing(tmp_path, blobs16, tiny_train_config):
    train(tmp_path, 10, data=blobs16, config=tiny_config(), train_config=tiny_train_config, checkpoint_every=5,
          **SMALL_PREVIEWS)
    before = files_of(tmp_path)
    for max_steps in (10, 7):
        result = train(tmp_path, max_steps, resume=True, data=blobs16, checkpoint_every=5, **SMALL_PREVIEWS)
        assert result.losses == [] and result.step == 10 and result.interrupted_by is None
    assert files_of(tmp_path) == before
    r = run_cli("--out", str(tmp_path), "--resume", "--max-steps", "10")
    assert r.returncode == 0 and "nothing to do" in r.stderr and "training" not in r.stderr, r.stderr
    assert files_of(tmp_path) == before


def test_a_new_run_starts_its_logs_anew(tmp_path, blobs16, tiny_train_config):
    train(tmp_path, 7, data=blobs16, config=tiny_config(), train_config=tiny_train_config, checkpoint_every=5,
          **SMALL_PREVIEWS)
    (tmp_path / "checkpoint.pt").unlink()
    train(tmp_path, 6, data=blobs16, config=tiny_config(), train_config=tiny_train_config, checkpoint_every=5,
          **SMALL_PREVIEWS)
    assert logged_steps(tmp_path / "train_log.csv") == list(range(1, 7))
    assert logged_steps(tmp_path / "eval_log.csv") == [5, 6]  # every 5 steps, and one at the end


class Killed(Exception):
    """Stands in for a kill: the run stops at once, without its final checkpoint."""


def test_resume_after_a_crash_logs_each_step_once(tmp_path, blobs16, tiny_train_config):
    def crash_at_27(step, loss, speed):
        if step == 27:
            raise Killed

    with pytest.raises(Killed):
        train(tmp_path, 100, data=blobs16, config=tiny_config(), train_config=tiny_train_config, checkpoint_every=20,
              progress=crash_at_27, **SMALL_PREVIEWS)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 20
    assert logged_steps(tmp_path / "train_log.csv")[-1] == 27 and logged_steps(tmp_path / "eval_log.csv")[-1] == 25
    train(tmp_path, 32, resume=True, data=blobs16, checkpoint_every=20, **SMALL_PREVIEWS)
    assert logged_steps(tmp_path / "train_log.csv") == list(range(1, 33))
    assert logged_steps(tmp_path / "eval_log.csv") == [5, 10, 15, 20, 25, 30, 32]
    whole = train(tmp_path / "whole", 32, data=blobs16, config=tiny_config(), train_config=tiny_train_config,
                  **NO_PREVIEW)
    with open(tmp_path / "train_log.csv", newline="") as f:
        assert [float(row["loss"]) for row in csv.DictReader(f)] == [round(v, 6) for v in whole.losses]


# A training run in a child process, killed with SIGKILL: no handler runs, nothing is flushed or cleaned up.
KILLED_RUN = """
import sys
sys.path.insert(0, sys.argv[2])
from conftest import blob_images, tiny_config
from patchgen.models.config import TrainConfig
from patchgen.models.data import DataSource, ImageSet
from patchgen.models.train import train
data = ImageSet(blob_images(64, 16), DataSource("blobs", num_images=64))
train(sys.argv[1], 100000, data=data, config=tiny_config(), train_config=TrainConfig(batch_size=8), checkpoint_every=20,
      preview_every=5, preview_count=2, preview_steps=2)
"""


def test_kill_9_then_resume_logs_each_step_once(tmp_path, blobs16):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(run), str(Path(__file__).parent)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = run / "train_log.csv"
    deadline = time.monotonic() + 600  # generous: on a loaded 2-core machine 27 steps took over 120 s
    try:
        while not log.exists() or len(log.read_text().splitlines()) <= 27:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the run did not log 27 steps in 600 s"
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    step = load_checkpoint(run / "checkpoint.pt")["step"]
    last = max(logged_steps(log))
    assert step % 20 == 0 and last > step, (step, last)  # the killed run logged steps its checkpoint lacks
    result = train(run, last + 3, resume=True, data=blobs16, checkpoint_every=20, **SMALL_PREVIEWS)
    assert result.step == last + 3
    assert logged_steps(log) == list(range(1, last + 4))
    previews = list(range(5, last + 4, 5)) + ([last + 3] if (last + 3) % 5 else [])
    assert logged_steps(run / "eval_log.csv") == previews
    assert not list(run.glob(".*.tmp"))  # whatever the kill interrupted


def test_a_run_removes_only_its_own_stale_temporaries(tmp_path, blobs16, tiny_train_config):
    dead = 999_999_999  # above any pid_max: no such process
    stale = [f".checkpoint.pt.p{dead}.abc123.tmp", f".preview_0000005.png.p{dead}.x1.tmp",
             f".train_log.csv.p{dead}.y2.tmp"]
    kept = [f".checkpoint.pt.p{os.getpid()}.live.tmp",  # a live writer's file in progress
            f".model.onnx.p{dead}.z3.tmp", "notes.txt"]  # not this run's
    for resume in (False, True):
        for name in stale + kept:
            (tmp_path / name).write_text("x")
        train(tmp_path, 2 + 2 * resume, resume=resume, data=blobs16, config=tiny_config(),
              train_config=tiny_train_config, **NO_PREVIEW)
        assert sorted(p.name for p in tmp_path.iterdir() if p.name in stale + kept) == sorted(kept)


def test_noise_band_columns_for_any_number_of_timesteps(tmp_path, blobs16, tiny_train_config):
    config = tiny_config(schedule=Schedule(num_timesteps=100))
    train(tmp_path, 2, data=blobs16, config=config, train_config=tiny_train_config, preview_every=2, preview_count=2,
          preview_steps=2)
    with open(tmp_path / "eval_log.csv", newline="") as f:
        (row,) = csv.DictReader(f)
    assert all(row[column] for column in row), row
    assert float(row["mse_true_gcc_700_1000"]) > 0
    # so few timesteps that a band's share rounds to none: it still probes one timestep
    tiny_t = tiny_config(schedule=Schedule(kind="linear", num_timesteps=2, beta_start=0.5, beta_end=0.9999))
    bands = gcc_probe(new_state(tiny_t, tiny_train_config).ema, torch.zeros(2, 3, 16, 16))
    assert [b["band"] for b in bands] == ["0-300", "300-700", "700-1000"]


def test_sigterm_checkpoints_then_resumes(tmp_path, blobs16):
    for k, img in enumerate(blobs16.images[:16]):
        Image.fromarray(img).save(tmp_path / f"{k}.png")
    run = tmp_path / "run"
    args = [sys.executable, "-m", "patchgen.cli.train", "--data", str(tmp_path), "--image-size", "16",
            "--base-width", "8", "--channel-mults", "1,2", "--num-res-blocks", "1", "--attention-resolutions", "4",
            "--batch-size", "2", "--max-steps", "100000", "--preview-every", "0", "--out", str(run)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = run / "train_log.csv"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 4):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "--resume" in err and "Traceback" not in err
    step = load_checkpoint(run / "checkpoint.pt")["step"]
    assert step >= 3
    assert not list(run.glob("*.tmp"))
    r = run_cli("--out", str(run), "--resume", "--max-steps", str(step + 2), "--preview-every", "0")
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(run / "checkpoint.pt")["step"] == step + 2


@pytest.mark.quick
def test_seam_score_and_border_step():
    from patchgen.models.metrics import border_step, seam_score

    yy, xx = np.mgrid[:16, :16]
    smooth = np.repeat(((xx + yy) * 8).astype(np.uint8)[None, :, :, None], 3, axis=3)
    assert seam_score(smooth, 2) == pytest.approx(1.0)
    quilt = smooth.copy()
    quilt[:, :8, 8:] = 255 - quilt[:, :8, 8:]  # one quadrant from another picture
    assert seam_score(quilt, 2) > 3
    assert border_step(smooth, 2) == pytest.approx(8.0)  # each neighbour pair differs by 8
    assert border_step(quilt, 2) > 3 * 8


def _waves(n: int, size: int, seed: int = 0) -> np.ndarray:
    """n smooth uint8 images [n, size, size, 3]: sums of random plane waves, nothing aligned with any grid."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    out = np.zeros((n, size, size, 3))
    for i, c, _ in np.ndindex(n, 3, 4):
        fx, fy, phase = *rng.uniform(0.5, 4, 2), rng.uniform(0, 2 * np.pi)
        out[i, :, :, c] += np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)
    return ((out - out.min()) / np.ptp(out) * 255).astype(np.uint8)


def test_local_seam_score():
    """About 1 with no border, far above 1 for a pasted quilt; a smooth painter (flat insides, no seam) is not
    counted seamy as the global score counts it; the real images' values pinned."""
    from patchgen.models.data import load_named
    from patchgen.models.metrics import local_seam_score, seam_score

    smooth = _waves(16, 64)
    assert local_seam_score(smooth, 2) == pytest.approx(1.0, abs=0.01)
    assert local_seam_score(smooth, 4) == pytest.approx(1.0, abs=0.01)
    quilt = smooth.copy()
    for k, (rows, cols) in enumerate([(slice(0, 32), slice(32, 64)), (slice(32, 64), slice(0, 32)),
                                      (slice(32, 64), slice(32, 64))]):
        quilt[:, rows, cols] = np.roll(smooth, k + 1, axis=0)[:, rows, cols]  # each quadrant another image's
    assert local_seam_score(quilt, 2) > 4
    # flat insides, a gentle ramp at the borders' neighbourhoods: the global score calls it seamy, the local not
    painter = smooth.astype(np.float64)
    painter[:, 8:24, :], painter[:, 40:56, :] = painter[:, 8:24, :].mean(), painter[:, 40:56, :].mean()
    assert seam_score(painter, 2) > 1.2 and local_seam_score(painter, 2) == pytest.approx(1.0, abs=0.05)
    # the built-in images, pinned (a change here changes every eval_log.csv's "seam_real")
    faces = load_named("twemoji-faces", 64).images
    assert local_seam_score(faces, 2) == pytest.approx(0.9671, abs=1e-4)
    assert local_seam_score(faces, 4) == pytest.approx(1.0194, abs=1e-4)
    assert local_seam_score(load_named("twemoji", 64).images, 2) == pytest.approx(0.9132, abs=1e-4)


def test_evaluation_log(tmp_path, blobs16, tiny_train_config):
    """Each preview: the local seam beside the real images', KID, the loss since the last preview, the global
    seam in a column of its own, and a line saying whether the numbers still improve."""
    from patchgen.models.evaluation import EVAL_COLUMNS, read_log

    lines = []
    train(tmp_path, 4, data=blobs16, config=tiny_config(), train_config=tiny_train_config, preview_every=2,
          preview_count=4, preview_steps=2, on_preview=lines.append)
    rows = (tmp_path / "eval_log.csv").read_text().splitlines()
    assert rows[0].startswith("step,seam,seam_real,kid_x1000,loss,seam_global,seam_global_real,swap_increase_0_300")
    first, second = read_log(tmp_path / "eval_log.csv")
    assert (first["step"], second["step"]) == (2, 4) and rows[0].split(",") == EVAL_COLUMNS
    assert first["kid_x1000"] is not None and first["loss"] > 0 and first["seam_global"] > 0
    assert len(lines) == 2 and lines[0].startswith("preview at step 2: seam ") and "(real " in lines[0]
    assert "first preview" in lines[0] and ("improving" in lines[1] or "no new best" in lines[1]), lines


def test_an_old_evaluation_log_is_upgraded_on_resume(tmp_path, blobs16, tiny_train_config):
    """A run from before the local seam score: its eval_log's "seam" columns (the global score) are renamed, and
    the resumed run's rows match the header."""
    train(tmp_path, 2, data=blobs16, config=tiny_config(), train_config=tiny_train_config, preview_every=2,
          preview_count=4, preview_steps=2)
    (tmp_path / "eval_log.csv").write_text("step,seam,seam_real,swap_increase_0_300,swap_increase_300_700,"
                                           "swap_increase_700_1000,mse_true_gcc_700_1000\n"
                                           "2,2.5,0.8,0.03,0.02,0.004,0.48\n")
    train(tmp_path, 4, data=blobs16, resume=True)
    with open(tmp_path / "eval_log.csv", newline="") as f:
        old, new = list(csv.DictReader(f))
    assert (old["seam_global"], old["seam_global_real"], old["seam"]) == ("2.5", "0.8", "")
    assert old["swap_increase_0_300"] == "0.03"
    assert new["step"] == "4" and float(new["seam"]) > 0 and float(new["seam_global"]) > 0


@pytest.mark.quick
def test_the_verdict_says_whether_numbers_still_improve():
    from patchgen.models.evaluation import PATIENCE, verdict

    def row(step, kid, seam, loss):
        return {"step": step, "kid_x1000": kid, "seam": seam, "seam_real": 1.0, "loss": loss}

    rows = [row(500, 80, 1.5, 0.1)]
    assert "first preview" in verdict(rows)
    rows.append(row(1000, 60, 1.5, 0.1))
    assert verdict(rows) == "still improving (KID at a new best)"
    rows.append(row(1500, 59, 1.49, 0.0995))  # within every margin: not a new best
    assert verdict(rows).startswith("no new best at this preview (1 in a row")
    rows.append(row(2000, 59, 1.49, 0.0985))  # small gains add up: the loss is now 1.5% below its best
    assert verdict(rows) == "still improving (loss at a new best)"
    rows += [row(2500 + 500 * i, 61, 1.3 + 0.2 * (i % 2), 0.099) for i in range(PATIENCE)]
    assert verdict(rows[:-PATIENCE + 1]) == "still improving (seam at a new best)"
    assert verdict(rows).startswith(f"no new best at this preview ({PATIENCE - 1} in a row")
    rows.append(row(4500, 70, 1.4, 0.1))
    assert verdict(rows).startswith("no longer improving") and "since step 2500" in verdict(rows)
    # numbers missing (no feature network: no KID) are left out, not counted as worse; a number's first value
    # (a log upgraded from before KID and the local seam) is not a new best: it had nothing to beat
    assert verdict([row(1, None, 2.0, 0.5), row(2, None, 1.5, 0.5)]) == "still improving (seam at a new best)"
    assert verdict([row(1, None, None, 0.2), row(2, 50, 1.2, 0.1)]) == "still improving (loss at a new best)"
    assert "first preview" in verdict([row(1, None, None, None), row(2, 50, 1.2, 0.1)])


def test_a_bad_cell_in_the_evaluation_log_costs_that_number_not_the_run(tmp_path):
    from patchgen.models.evaluation import read_log

    (tmp_path / "eval_log.csv").write_text("step,seam,seam_real,kid_x1000,loss\n3,n/a,0.69,,0.5\n")
    assert read_log(tmp_path / "eval_log.csv") == [{"step": 3, "seam": None, "seam_real": 0.69, "kid_x1000": None,
                                                    "loss": 0.5}]


def test_resume_refuses_options_of_a_new_run(tmp_path, blobs16, tiny_train_config):
    """A resumed run keeps its checkpoint's configuration: options that would change it are refused, not ignored."""
    train(tmp_path, 1, data=blobs16, config=tiny_config(), train_config=tiny_train_config, **NO_PREVIEW)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    r = run_cli("--out", str(tmp_path), "--resume", "--max-steps", "2", "--grid", "4", "--timesteps", "3")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "--grid, --timesteps: only for a new run" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_resume_keeps_the_runs_cadence(tmp_path, blobs16, tiny_train_config):
    """--preview-every / --checkpoint-every given to a new run stay with it when it is resumed without them."""
    train(tmp_path, 2, data=blobs16, config=tiny_config(), train_config=tiny_train_config, checkpoint_every=3,
          preview_every=0)
    train(tmp_path, 4, resume=True, data=blobs16)
    assert not list(tmp_path.glob("preview_*.png")) and not (tmp_path / "eval_log.csv").exists()
    assert load_checkpoint(tmp_path / "checkpoint.pt")["cadence"] == {"checkpoint_every": 3, "preview_every": 0}


def test_api_resume_without_a_data_hook_reloads_the_named_data(tmp_path, blobs16, tiny_train_config):
    """A resume through the Python API with neither data nor load_data rebuilds the images from the
    checkpoint's data source (here a folder) and continues exactly."""
    folder = tmp_path / "images"
    folder.mkdir()
    for k, img in enumerate(blobs16.images[:20]):
        Image.fromarray(img).save(folder / f"{k:02d}.png")
    data = load_folder(folder, 16)
    whole = train(tmp_path / "a", 6, data=data, config=tiny_config(), train_config=tiny_train_config, **NO_PREVIEW)
    train(tmp_path / "b", 3, data=data, config=tiny_config(), train_config=tiny_train_config, **NO_PREVIEW)
    rest = train(tmp_path / "b", 6, resume=True, **NO_PREVIEW)
    assert rest.losses == whole.losses[3:]
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["data"] == dataclasses.replace(
        data.source, holdout_fraction=0.1, holdout_seed=0, image_size=16, num_train=18)


@pytest.mark.quick
def test_data_source_round_trips_through_a_checkpoint_dict():
    source = DataSource("noto-emoji-faces", "Noto", "Apache-2.0 AND OFL-1.1", 120, 0, 128, 0.1, 0, 108)
    assert DataSource.from_dict(source.to_dict()) == source
    old = {"name": "twemoji-faces", "license": "CC-BY-4.0", "num_train": 113, "unknown_key": 1}  # as 0.1 wrote it
    assert DataSource.from_dict(old) == DataSource("twemoji-faces", license="CC-BY-4.0", num_train=113)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cli_cuda_without_a_gpu_is_one_clear_error(tmp_path):
    r = run_cli("--device", "cuda", "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and r.stderr.splitlines() == [
        "Error: --device cuda: this torch build or machine has no CUDA GPU; use --device cpu, or install a CUDA "
        "build of torch"]
    assert not (tmp_path / "run").exists()


# ---- The recipe that works is the default; the paper's is one flag away; old runs resume as they were.

def _cli_settings(*args):
    """(ModelConfig, TrainConfig) that `patchgen-train ARGS` would start a new run with (nothing is trained)."""
    from patchgen.cli.train import SETTINGS, _new_run, main

    params = main.make_context("patchgen-train", ["--out", "unused", *map(str, args)]).params
    run = _new_run({s.param: params[s.param] for s in SETTINGS})
    return run.config, run.train_config


def test_the_default_config_is_the_recipe_and_paper_is_the_papers():
    from patchgen.models.config import ModelConfig, recipe_settings

    config, train_config = _cli_settings()  # 64x64, 2x2 patches of 32 px, 3 levels: the shipped faces64_2x2's recipe
    assert (config.prediction, config.global_context, config.halo) == ("x0", 4, 8)
    assert (train_config.lr, train_config.recipe) == (5e-4, "patchgen")
    assert config == dataclasses.replace(ModelConfig(), prediction="x0", global_context=4, halo=8)
    assert train_config == dataclasses.replace(TrainConfig(), lr=5e-4, recipe="patchgen")
    # Arakawa et al.: eps, one-hot position + GCC of x_t, no halo
    config, train_config = _cli_settings("--recipe", "paper")
    assert config == ModelConfig() and train_config == dataclasses.replace(TrainConfig(), recipe="paper")
    # the halo follows the patch and the levels, so the default always builds; a 1x1 model gets neither lever
    for size, grid, mults in [(32, 2, "1,2"), (64, 4, "1,2,2"), (128, 4, "1,2,2,2"), (96, 2, "1,2,2,2"),
                              (24, 2, "1,2"), (16, 4, "1"), (64, 1, "1,2,2")]:
        config, _ = _cli_settings("--image-size", size, "--grid", grid, "--channel-mults", mults,
                                  "--attention-resolutions", "")
        p, levels = size // grid, len(mults.split(","))
        assert config.halo == recipe_settings("patchgen", size, grid, levels)["halo"]
        assert (config.halo == 0) == (grid == 1) and (config.global_context == 0) == (grid == 1)
        if grid > 1:
            assert abs(config.halo - p / 4) <= 2 ** (levels - 1) / 2 and p % config.global_context == 0
    # every lever still settable on its own
    config, train_config = _cli_settings("--halo", 0, "--prediction", "v", "--lr", "1e-4", "--global-context", 2)
    assert (config.halo, config.prediction, train_config.lr, config.global_context) == (0, "v", 1e-4, 2)
    assert _cli_settings("--no-gcc")[0].global_context == 0


def test_a_checkpoint_from_before_the_recipes_resumes_as_it_was_trained(tmp_path):
    """A run started under the old defaults (eps, no halo, no global vector, lr 2e-4), saved without the
    fields added since (recipe, halo, global_context, edge_mask), resumes with exactly its own settings."""
    from patchgen.models.checkpoint import save_checkpoint

    config = tiny_config(prediction="eps")
    (tmp_path / "images").mkdir()
    images = load_folder(blob_folder(tmp_path / "images", 8), config.image_size)
    train(tmp_path / "run", 2, data=images, config=config, train_config=TrainConfig(batch_size=4), **NO_PREVIEW)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    for key in ("halo", "global_context", "edge_mask"):
        del ckpt["model_config"][key]
    del ckpt["train_config"]["recipe"]
    save_checkpoint(tmp_path / "run" / "checkpoint.pt", {k: v for k, v in ckpt.items()
                                                         if k not in ("format", "version")})
    before = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    r = subprocess.run([sys.executable, "-m", "patchgen.cli.train", "--resume", "--max-steps", "3", "--out",
                        tmp_path / "run", "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    after = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert after["step"] == 3 and after["model_config"] == before["model_config"] == config
    assert after["train_config"] == before["train_config"] and after["train_config"].recipe == ""
    assert (config.prediction, config.halo, config.global_context, after["train_config"].lr) == ("eps", 0, 0, 2e-4)


def test_each_setting_is_declared_once_as_a_config_field():
    """patchgen-train's options of a new run are made from the config fields that carry an Option, each refused
    on --resume and named as its option in errors; ModelConfig holds each ModelSpec field under its name."""
    from patchgen.cli.train import FIELD_OPTIONS, NEW_RUN_OPTIONS, NewRun, main
    from patchgen.models.config import ModelConfig, field_options
    from patchgen.runtime.spec import ModelSpec

    options = {p.name for p in main.params}
    made = {o.key or f.name: o for cls in (NewRun, ModelConfig, TrainConfig) for f, o in field_options(cls)}
    assert set(NEW_RUN_OPTIONS) <= options and len(NEW_RUN_OPTIONS) == len(made)
    assert {"no_gcc", "no_position", "timesteps", "schedule", "recipe", "halo", "lr", "holdout"} <= set(NEW_RUN_OPTIONS)
    assert FIELD_OPTIONS["num_timesteps"] == "--timesteps" and FIELD_OPTIONS["global_context"] == "--global-context"
    assert "attention_heads" not in made and "weight_decay" not in made  # fields without an option
    config = tiny_config(halo=2, prediction="x0")
    assert config.spec == ModelSpec(**{f.name: getattr(config, f.name) for f in dataclasses.fields(ModelSpec)})
