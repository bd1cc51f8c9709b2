"""The machine-readable record of a `patchgen-sample` run (`--report PATH.json`): what benchmarks and scripts
read, instead of the lines on stderr, which are worded for people and may change.

Schema 1: one JSON object, written atomically (`files.atomic_output`) when the run ends, however it ends once
its outputs were checked: done, refused or failed (error), or stopped by Ctrl-C or SIGTERM.

- `schema`: 1; a field's meaning never changes within a schema number, and fields may be added.
- `status`: "done" (every image written), "error" (exit 2 or a crash: see `error`), "stopped" (a signal).
- `model`: `path` (the .onnx file, a shipped model's included), `name` (its stem), then, once it was opened
  (else null): `sha256` (of the file and its external data, as the PNGs record it), `provider`,
  `graph` (how it was opened: "cached", "built", "direct"), `image_size`, `channels`, `grid`, `patch_size`,
  `halo` (pixels).
- `request`: `num_images`, `seed`, `sampler`, `steps` (null when the model's default was not yet known),
  `steps_run` (per image: fewer for an img2img edit), `eta` (ddim's noise; null for the others), `edit`
  (null, or `kind`, `strength`, `repaint_jumps`).
- `plan` (null before one was made): `patch_batch` (patches per onnxruntime call), `images_per_run`,
  `allocation` ("lean" or "arena"), `threads` (onnxruntime intra-op), `budget_bytes` (null: none, as with
  --patch-batch or --memory-budget min), `default_budget` (true when the budget was the default share),
  `predicted_peak_bytes` and `predicted_seconds_per_step` (null unless the planner measured them).
- `peak_rss_bytes`: the process's peak resident set as the kernel reports it when the report is written
  (VmHWM, else ru_maxrss).
- `seconds`: `total` (from the command's start, model loading and planning included), `sampling` (the
  sampler's loop, null when it did not run), `per_image` (sampling / images written; null without any).
- `files`: the paths written, as given on the command line: the images in index order, then the preview and
  the grid image, each once written.
- `error` (null when done): `message` (the line printed as `Error: ...`, or the exception's text), `stage`
  ("loading", "editing", "planning", "sampling": what the run was doing), and
  `minimum_budget_bytes` (a budget the run was refused as too small for: the minimum it named, else null; a
  refusal while loading is a bound from the weights alone, one while planning the measured minimum of one patch
  per call, which a fresh run accepts).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

SCHEMA = 1


@dataclass
class RunRecord:
    """What a run has done so far, filled in as it goes; `record` turns it into the report's fields."""

    model_file: Path
    out_dir: Path
    num_images: int
    seed: int
    sampler: str
    steps: Optional[int]
    eta: Optional[float]
    stage: str = "loading"  # then "editing", "planning", "sampling": what the run is doing
    model: object = None  # the OnnxModel, once opened
    plan: object = None  # the Plan, once made
    images: list[int] = field(default_factory=list)  # the indices of the images on disk
    beside: list[Path] = field(default_factory=list)  # the grid image, the preview, once written
    started: float = field(default_factory=time.perf_counter)
    sampling_seconds: Optional[float] = None

    def image_path(self, index: int) -> Path:
        return self.out_dir / f"seed{self.seed}_{index:05d}.png"


def record(run: RunRecord, status: str, error: Optional[BaseException] = None) -> dict:
    """The report of `run` (schema 1, above) as it ends with `status`: "done", "error" or "stopped"."""
    from patchgen.runtime.memory import peak_rss

    done = len(run.images)
    return {"schema": SCHEMA, "status": status, "model": _model(run), "request": _request(run),
            "plan": _plan(run.plan, run.model), "peak_rss_bytes": peak_rss(),
            "seconds": {"total": time.perf_counter() - run.started, "sampling": run.sampling_seconds,
                        "per_image": run.sampling_seconds / done if run.sampling_seconds is not None and done
                        else None},
            "files": [str(run.image_path(i)) for i in sorted(run.images)] + [str(p) for p in run.beside],
            "error": None if error is None else {"message": _message(error), "stage": run.stage,
                                                 "minimum_budget_bytes": _minimum(error)}}


def _minimum(error: BaseException) -> Optional[int]:
    """The budget (bytes) a BudgetTooSmall refusal named as this run's minimum; None for any other error."""
    minimum = getattr(error, "minimum", None)
    return None if minimum is None else math.ceil(minimum)


def _message(error: BaseException) -> str:
    """The line the command prints for `error` (without "Error: "), or the exception's own text."""
    from patchgen.runtime.errors import PatchgenError
    from patchgen.runtime.files import os_error

    from .common import as_option

    if isinstance(error, PatchgenError):
        return error.worded(as_option)  # as cli.common.user_errors words it: in the command's options
    if isinstance(error, OSError):
        error = os_error(error)
    return str(getattr(error, "message", None) or error) or type(error).__name__


def _model(run: RunRecord) -> dict:
    fields = {"path": str(run.model_file), "name": run.model_file.stem}
    m = run.model
    if m is None:
        return {**fields, **dict.fromkeys(("sha256", "provider", "graph", "image_size", "channels", "grid",
                                           "patch_size", "halo"))}
    return {**fields, "sha256": m.sha256, "provider": m.provider, "graph": m.graph, "image_size": m.spec.image_size,
            "channels": m.spec.image_shape[0], "grid": m.spec.grid, "patch_size": m.spec.patch_size,
            "halo": m.spec.halo}


def _request(run: RunRecord) -> dict:
    r = getattr(run.plan, "request", None)
    if r is None:  # not yet checked against the model: as given
        return {"num_images": run.num_images, "seed": run.seed, "sampler": run.sampler, "steps": run.steps,
                "steps_run": None, "eta": run.eta, "edit": None}
    edit = None if r.edit is None else {"kind": r.edit.kind, "strength": r.edit.strength,
                                        "repaint_jumps": r.edit.jumps}
    return {"num_images": r.num_images, "seed": r.seed, "sampler": r.sampler, "steps": r.steps,
            "steps_run": r.steps_run, "eta": r.eta, "edit": edit}


def _plan(plan, model) -> Optional[dict]:
    if plan is None:
        return None
    return {"patch_batch": plan.patch_batch, "images_per_run": plan.images_per_run, "allocation": plan.allocation,
            "threads": model.threads, "budget_bytes": plan.budget, "default_budget": plan.default_budget,
            "predicted_peak_bytes": plan.predicted_peak,
            "predicted_seconds_per_step": plan.seconds_per_step(model.spec.grid)}


def write_report(path: Path, report: dict) -> None:
    """Write `report` to `path` as JSON, atomically: a reader sees the old file or the whole new one."""
    from patchgen.runtime.files import atomic_output

    with atomic_output(path, "w", elsewhere="choose another --report") as f:
        f.write(json.dumps(report, indent=1) + "\n")
