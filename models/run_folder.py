"""The run folder's files: claiming the folder for one run (`run_folder`), getting it ready to write
(`prepare_folder`: free space, a killed run's temporaries, the logs continued from the checkpoint's step or
started anew, config.json), and the per-step train_log.csv (`TrainLog`). Rank 0 alone writes there."""
from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path
from typing import Iterator

from patchgen.runtime.errors import ArgumentError, Phrase
from patchgen.runtime.files import (atomic_output, check_free_space, check_writable_folder, claim, made_folder,
                                    remove_if_empty, remove_stale_temporaries, write_error)

from . import distributed

CHECKPOINT_NAME = "checkpoint.pt"
RUN_LOCK = ".patchgen-train.lock"  # held (flock) by the run writing the folder, removed when it ends
ELSEWHERE = Phrase("choose another {run_dir}", run_dir=None)  # for runtime/files.py's helpers
LOG_NAMES = ("train_log.csv", "eval_log.csv")  # one row per step / per preview step, up to the checkpoint's step
# What a run writes atomically, as glob patterns: the temporaries a killed run left are removed at the next start.
ATOMIC_OUTPUTS = (CHECKPOINT_NAME, "preview_*.png", "config.json", *LOG_NAMES)


def check_run_folder(run_dir, resume: bool) -> Path:
    """The run's checkpoint path, once `run_dir` fits the request: a resume needs the checkpoint, a new run
    must not overwrite one. Cheap and writes nothing, so callers can fail before loading any data."""
    ckpt_path = Path(run_dir) / CHECKPOINT_NAME
    if resume and not ckpt_path.is_file():
        raise ArgumentError(f"checkpoint {ckpt_path} does not exist: nothing to resume; ",
                            "leave out {resume} to start a new run there", resume=True)
    if not resume and ckpt_path.exists():
        raise ArgumentError(f"{ckpt_path} already exists: ", "pass {resume} to continue it or choose a new {run_dir}",
                            resume=True, run_dir=None)
    return ckpt_path


@contextlib.contextmanager
def run_folder(run_dir, resume: bool) -> Iterator[Path]:
    """Claim `run_dir` for this run, before any data is loaded: yields its checkpoint path.

    Rank 0 creates the folder (a new run), claims it for the block (`files.claim`: a second run into it,
    new or resumed, gets one line naming this one's pid), checks it again under the claim and checks that
    files can be written there. A new run that fails before writing anything leaves no folder behind.
    Re-entrant: `train` claims again inside the CLI's claim. The other ranks only check."""
    ckpt_path = check_run_folder(run_dir, resume)
    if not distributed.world().writer:
        yield ckpt_path
        return
    folder, made = made_folder(run_dir)
    try:
        with claim(folder / RUN_LOCK, f"run folder {folder}",
                   Phrase(f"wait for that run to end, or {ELSEWHERE.text}", **ELSEWHERE.arguments)):
            check_run_folder(folder, resume)  # again: another run may have written it before our claim
            check_writable_folder(folder)
            yield ckpt_path
    finally:
        remove_if_empty(made)  # a new run that wrote nothing: its folders go (a non-empty one stays)


def truncate_log(path: Path, step: int) -> None:
    """Keep a CSV log's header and its rows up to `step` (the checkpoint's), rewritten atomically.

    A run killed after its last checkpoint has logged steps beyond it, which the resumed run logs again.
    A row the kill cut short has fewer fields and goes too.
    """
    if not path.exists():
        return
    with open(path, newline="") as f:
        header, *rows = list(csv.reader(f)) or [[]]
    kept = [r for r in rows if len(r) == len(header) and r[0].isdigit() and int(r[0]) <= step]
    if len(kept) == len(rows):
        return
    text = io.StringIO()
    csv.writer(text).writerows([header, *kept])
    with atomic_output(path) as f:
        f.write(text.getvalue().encode())


def prepare_folder(run_dir: Path, resume: bool, step: int, checkpoint_bytes: int, settings: dict) -> None:
    """Create the run folder, once a checkpoint of `checkpoint_bytes` fits there; remove a killed run's
    temporaries; continue the logs from the checkpoint's `step` (resume) or start them anew, with config.json
    holding `settings` (a new run). Rank 0 does it; the other ranks wait for it."""
    if distributed.world().writer:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            # before the first write: the checkpoint must fit (a resumed run's next one is written beside the old)
            check_free_space(run_dir, checkpoint_bytes, "a checkpoint of this model", ELSEWHERE)
            _start_logs(run_dir, resume, step, settings)
        except OSError as e:
            raise write_error(e, run_dir, ELSEWHERE) from None
    distributed.barrier()


def _start_logs(run_dir: Path, resume: bool, step: int, settings: dict) -> None:
    for pattern in ATOMIC_OUTPUTS:
        remove_stale_temporaries(run_dir, pattern)
    for name in LOG_NAMES:
        if resume:
            truncate_log(run_dir / name, step)
        else:
            (run_dir / name).unlink(missing_ok=True)
    if not resume:
        with atomic_output(run_dir / "config.json") as f:
            f.write((json.dumps(settings, indent=1, default=str) + "\n").encode())


class TrainLog:
    """train_log.csv, appended to by rank 0 alone (`writer`): one row per step."""

    def __init__(self, path: Path, writer: bool):
        self.path, self.writer, self.file = path, writer, None

    def __enter__(self):
        if self.writer:
            try:
                self.file = open(self.path, "a", newline="")
                self.csv = csv.writer(self.file)
                if self.file.tell() == 0:
                    self.csv.writerow(["step", "loss", "lr", "images_per_s"])
            except OSError as e:
                raise write_error(e, self.path, ELSEWHERE) from None
        return self

    def row(self, step: int, loss: float, lr: float, speed: float) -> None:
        """One step: its loss, learning rate and speed (images per second)."""
        if self.file is not None:
            try:
                self.csv.writerow([step, f"{loss:.6f}", f"{lr:.3e}", f"{speed:.2f}"])
                self.file.flush()
            except OSError as e:
                raise write_error(e, self.path, ELSEWHERE) from None

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()
