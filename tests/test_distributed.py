"""Data-parallel training under torchrun (two gloo ranks on the CPU): the same losses as one process with the
same global batch, rank 0 the only writer, exact resume, and a stop signal to one rank stopping all of them."""
import csv
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from patchgen.models.distributed import World, rank_seed
from patchgen.runtime.errors import PatchgenError

from conftest import blob_folder

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
# patchgen-train with save_checkpoint wrapped: every call appends the calling rank to $SAVES.
RECORDER = """
import os
import patchgen.models.train as train

real = train.save_checkpoint


def save_checkpoint(path, state):
    with open(os.environ["SAVES"], "a") as f:
        f.write(os.environ.get("RANK", "0") + "\\n")
    real(path, state)


train.save_checkpoint = save_checkpoint
with open(os.path.join(os.environ["PIDS"], "rank" + os.environ.get("RANK", "0")), "w") as f:
    f.write(str(os.getpid()))
from patchgen.cli.train import main

main()
"""
# x0 prediction with self-conditioned GCC and 2 of 4 patches per image: every draw of a step is split by rank.
MODEL = ["--image-size", "16", "--grid", "2", "--base-width", "8", "--channel-mults", "1,2", "--num-res-blocks",
         "1", "--attention-resolutions", "4", "--batch-size", "8", "--warmup-steps", "2", "--holdout", "0",
         "--prediction", "x0", "--gcc-source", "x0", "--patches-per-image", "2", "--global-context", "2"]
SESSION = ["--preview-every", "0", "--checkpoint-every", "3"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return blob_folder(tmp_path_factory.mktemp("images"), 24)


def launch(tmp_path, ranks, *args, wait=True):
    """patchgen-train (with the recorder) in `ranks` processes: torchrun for 2, a plain process for 1."""
    script = tmp_path / "record.py"
    script.write_text(RECORDER)
    env = {**os.environ, "SAVES": str(tmp_path / "saves"), "PIDS": str(tmp_path), "OMP_NUM_THREADS": "1"}
    command = [*TORCHRUN, str(ranks), str(script)] if ranks > 1 else [sys.executable, str(script)]
    proc = subprocess.Popen([*command, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def log_rows(run):
    with open(run / "train_log.csv", newline="") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


def saves(tmp_path):
    return (tmp_path / "saves").read_text().split()


def weights(run):
    return torch.load(run / "checkpoint.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, folder):
    """6 steps on 2 ranks, uninterrupted, checkpoints at 3 and 6."""
    tmp = tmp_path_factory.mktemp("two")
    r = launch(tmp, 2, "--data", folder, *MODEL, *SESSION, "--max-steps", 6, "--out", tmp / "run")
    assert r.returncode == 0, r.stderr
    return tmp, r


def test_two_ranks_give_one_rank_losses(tmp_path, folder, two_rank_run):
    """Same global batch, same losses: each rank computes half the batch from the same random draws, and DDP
    averages the gradients. What differs is the order of float32 additions in that average (~1e-7 relative);
    after 6 Adam steps the losses still agree to 1e-5 (the log rounds them to 1e-6)."""
    tmp2, r2 = two_rank_run
    r1 = launch(tmp_path, 1, "--data", folder, *MODEL, *SESSION, "--max-steps", 6, "--out", tmp_path / "run",
                "--threads", 1)
    assert r1.returncode == 0, r1.stderr
    one, two = log_rows(tmp_path / "run"), log_rows(tmp2 / "run")
    assert [s for s, _ in two] == [1, 2, 3, 4, 5, 6]
    assert [loss for _, loss in two] == pytest.approx([loss for _, loss in one], abs=1e-5)
    assert "data-parallel on 2 ranks" in r2.stderr and r2.stderr.count("checkpoint at step 6") == 1


def test_rank_0_alone_writes(two_rank_run):
    tmp, _ = two_rank_run
    assert saves(tmp) == ["0", "0"]  # the checkpoints at steps 3 and 6, by rank 0
    assert sorted(p.name for p in (tmp / "run").iterdir()) == ["checkpoint.pt", "config.json", "train_log.csv"]
    ckpt = torch.load(tmp / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 6 and len(ckpt["rng"]["torch_ranks"]) == 2


def test_resume_on_two_ranks_is_exact(tmp_path, folder):
    """3 steps, then a resume to 6, both on 2 ranks, equal 6 uninterrupted steps exactly; with dropout, so each
    rank's own generator must come back from the checkpoint."""
    model = [*MODEL, "--dropout", "0.1"]
    whole = launch(tmp_path, 2, "--data", folder, *model, *SESSION, "--max-steps", 6, "--out", tmp_path / "whole")
    first = launch(tmp_path, 2, "--data", folder, *model, *SESSION, "--max-steps", 3, "--out", tmp_path / "part")
    second = launch(tmp_path, 2, "--resume", "--max-steps", 6, "--out", tmp_path / "part")
    assert whole.returncode == first.returncode == second.returncode == 0, second.stderr
    assert log_rows(tmp_path / "part") == log_rows(tmp_path / "whole")
    a, b = weights(tmp_path / "part"), weights(tmp_path / "whole")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_on_another_world_size(tmp_path, folder, two_rank_run):
    """A one-process checkpoint continues on 2 ranks: the data and noise stream is the same at any world size,
    so only the float32 order of the gradient average differs."""
    tmp2, _ = two_rank_run
    first = launch(tmp_path, 1, "--data", folder, *MODEL, *SESSION, "--max-steps", 3, "--out", tmp_path / "run",
                   "--threads", 1)
    second = launch(tmp_path, 2, "--resume", "--max-steps", 6, "--out", tmp_path / "run")
    assert first.returncode == second.returncode == 0, second.stderr
    rows, reference = log_rows(tmp_path / "run"), log_rows(tmp2 / "run")
    assert [s for s, _ in rows] == [s for s, _ in reference]
    assert [loss for _, loss in rows] == pytest.approx([loss for _, loss in reference], abs=1e-5)


def test_signal_to_one_rank_stops_all(tmp_path, folder):
    """SIGINT to rank 1 alone: every rank finishes its step, rank 0 checkpoints once, reports and exits 128 + 2
    first (rank 1 waits for it: `_exit_after_rank0`), so torchrun names rank 0's exit code."""
    run = tmp_path / "run"
    proc = launch(tmp_path, 2, "--data", folder, *MODEL, "--preview-every", 0, "--checkpoint-every", 10000,
                  "--max-steps", 100000, "--out", run, wait=False)
    deadline = time.monotonic() + 300
    while not ((run / "train_log.csv").exists() and len(log_rows(run)) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    os.kill(int((tmp_path / "rank1").read_text()), signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and re.search(r"rank      : 0 \(local_rank: 0\)\n  exitcode  : 130 ", err), err[-3000:]
    assert "interrupted: checkpoint saved; continue with --resume" in err
    steps = [s for s, _ in log_rows(run)]
    assert steps == list(range(1, len(steps) + 1))
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == steps[-1]
    assert saves(tmp_path) == ["0"]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.json", "train_log.csv"]


def test_batch_that_does_not_split_is_one_clear_error(tmp_path, folder):
    r = launch(tmp_path, 2, "--data", folder, *MODEL, "--batch-size", 7, "--max-steps", 2, "--out", tmp_path / "run")
    assert r.returncode != 0
    assert r.stderr.count("Error: the batch of 7 images does not split evenly over 2 ranks; use a batch size that "
                          "is a multiple of 2") == 2, r.stderr[-3000:]
    assert "[rank0]: Traceback" not in r.stderr and not (tmp_path / "run").exists()


@pytest.mark.quick
def test_world_part_and_rank_seed():
    assert World(0, 1).part(5) == slice(0, 5)
    assert [World(r, 4).part(8) for r in range(4)] == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    with pytest.raises(PatchgenError, match="multiple of 3"):
        World(1, 3).part(8)
    seeds = {rank_seed(0, rank, step) for rank in range(3) for step in (0, 1)}
    assert len(seeds) == 6 and rank_seed(0, 1, 0) == rank_seed(0, 1, 0)
