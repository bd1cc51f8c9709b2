"""The machine-readable records of `patchgen-sample` and `patchgen-export` (`--report PATH.json`): what benchmarks
and scripts read, instead of the lines the commands print, which are worded for people and may change.

Schema 1: one JSON object, written atomically (`files.atomic_output`) when the command ends, however it ends once
its options were checked (patchgen-sample: and its outputs): done, refused or failed (error), or stopped by Ctrl-C
or SIGTERM. A --report path that cannot be written is refused before any work, with no report.

Every report:
- `schema`: 1; a field's meaning never changes within a schema number, and fields may be added.
- `command`: "patchgen-sample" or "patchgen-export"; `version`: patchgen's (its package's; "unknown" if none).
- `status`: "done", "error" (exit 2 or a crash: see `error`), "stopped" (a signal).
- `seconds`: `total`, from the command's start.
- `error` (null unless status is "error"): `message`, the line printed as `Error: ...` (a library error worded
  in the command's options), or the exception's text; and the command's own members below.

patchgen-sample:
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
- `seconds`: also `sampling` (the sampler's loop, null when it did not run), `per_image` (sampling / images
  written; null without any).
- `files`: the paths written, as given on the command line: the images in index order, then the preview and
  the grid image, each once written.
- `error`: also `stage` ("loading", "editing", "planning", "sampling": what the run was doing), and
  `minimum_budget_bytes` (a budget the run was refused as too small for: the minimum it named, else null; a
  refusal while loading is a bound from the weights alone, one while planning the measured minimum of one patch
  per call, which a fresh run accepts).

patchgen-export:
- `checkpoint`: the path given.
- `request`: `precision` ("fp32", "fp16", "int8"), `int8_activations` ("uint8", "int8"; null unless int8),
  `weights` ("ema" or "raw"), `simplify` (onnxsim ran), `calibration_data` (null: the checkpoint's own images).
- `parity` (export/parity.py; errors in the units of what the network predicts): `checked` (false with
  --skip-check), `prediction` ("eps", "v" or "x0"; null when not known), `max_error` (the float32 graph's worst
  sample against torch) and `max_error_tolerance`, `rms_error` (an fp16 or int8 file's RMS error on fresh
  training windows) and `rms_error_tolerance` (both null for fp32). An error is null where it was not measured
  (or was not a number); a check that failed keeps its measure, and `error` says so.
- `parameters`: the network's parameter count; `model_sha256`: the file's hash as patchgen-sample's report and
  the PNGs record it (both null unless done).
- `files` ([] unless done): the .onnx file, then its external-data file if it has one: each `path`, `bytes` and
  `sha256` (of that file alone, what `sha256sum` prints).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import click

SCHEMA = 1

# A command's record as it ends: (status, the error or None) -> the report.
Record = Callable[[str, Optional[BaseException]], dict]


@contextlib.contextmanager
def reported(path: Optional[Path], record: Record) -> Iterator[None]:
    """Write `record`'s report to `path` (None: none) as the block ends: done, error or stopped. After an error
    or a stop, a report that cannot be written is a note, and the command's own error stands."""
    if path is None:
        yield
        return
    try:
        yield
    except KeyboardInterrupt:
        _report_anyway(path, record("stopped", None))
        raise
    except Exception as e:
        _report_anyway(path, record("error", e))
        raise
    write_report(path, record("done", None))


def _report_anyway(path: Path, report: dict) -> None:
    from patchgen.runtime.errors import PatchgenError

    from .common import one_line

    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # in an --out that the run did not get to make
        write_report(path, report)
    except (PatchgenError, OSError) as e:
        click.echo(f"note: no report: {one_line(str(e))}", err=True)


def write_report(path: Path, report: dict) -> None:
    """Write `report` to `path` as JSON, atomically: a reader sees the old file or the whole new one."""
    from patchgen.runtime.files import atomic_output

    with atomic_output(path, "w", elsewhere="choose another --report") as f:
        f.write(json.dumps(report, indent=1) + "\n")


def header(command: str, status: str) -> dict:
    """The members every report begins with."""
    from patchgen.runtime.metadata import patchgen_version

    return {"schema": SCHEMA, "command": command, "version": patchgen_version(), "status": status}


def message(error: BaseException) -> str:
    """The line the command prints for `error` (without "Error: "), or the exception's own text."""
    from patchgen.runtime.errors import PatchgenError
    from patchgen.runtime.files import os_error

    from .common import as_option

    if isinstance(error, PatchgenError):
        return error.worded(as_option)  # as cli.common.user_errors words it: in the command's options
    if isinstance(error, OSError):
        error = os_error(error)
    return str(getattr(error, "message", None) or error) or type(error).__name__


def _finite(value: Optional[float]) -> Optional[float]:
    """`value`, or None for one JSON cannot hold (NaN, infinity)."""
    return value if value is not None and math.isfinite(value) else None


# ---- patchgen-sample

@dataclass
class SampleRecord:
    """What a sampling run has done so far, filled in as it goes; `sample_record` turns it into its report."""

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


def sample_record(run: SampleRecord, status: str, error: Optional[BaseException] = None) -> dict:
    """The report of `run` (schema 1, above) as it ends with `status`: "done", "error" or "stopped"."""
    from patchgen.runtime.memory import peak_rss

    done = len(run.images)
    return {**header("patchgen-sample", status), "model": _model(run), "request": _request(run),
            "plan": _plan(run.plan, run.model), "peak_rss_bytes": peak_rss(),
            "seconds": {"total": time.perf_counter() - run.started, "sampling": run.sampling_seconds,
                        "per_image": run.sampling_seconds / done if run.sampling_seconds is not None and done
                        else None},
            "files": [str(run.image_path(i)) for i in sorted(run.images)] + [str(p) for p in run.beside],
            "error": None if error is None else {"message": message(error), "stage": run.stage,
                                                 "minimum_budget_bytes": _minimum(error)}}


def _minimum(error: BaseException) -> Optional[int]:
    """The budget (bytes) a BudgetTooSmall refusal named as this run's minimum; None for any other error."""
    minimum = getattr(error, "minimum", None)
    return None if minimum is None else math.ceil(minimum)


def _model(run: SampleRecord) -> dict:
    fields = {"path": str(run.model_file), "name": run.model_file.stem}
    m = run.model
    if m is None:
        return {**fields, **dict.fromkeys(("sha256", "provider", "graph", "image_size", "channels", "grid",
                                           "patch_size", "halo"))}
    return {**fields, "sha256": m.sha256, "provider": m.provider, "graph": m.graph, "image_size": m.spec.image_size,
            "channels": m.spec.image_shape[0], "grid": m.spec.grid, "patch_size": m.spec.patch_size,
            "halo": m.spec.halo}


def _request(run: SampleRecord) -> dict:
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



# ---- patchgen-export

@dataclass
class ExportRecord:
    """An export's request, and its result once done; `export_record` turns it into its report."""

    checkpoint: Path
    precision: str  # "fp32", "fp16" or "int8"
    int8_activations: Optional[str]  # "uint8" or "int8" with int8, else None
    ema: bool
    simplify: bool
    check: bool
    calibration_data: Optional[str]
    result: object = None  # export_onnx's ExportReport, once done
    started: float = field(default_factory=time.perf_counter)


def export_record(run: ExportRecord, status: str, error: Optional[BaseException] = None) -> dict:
    """The report of `run` (schema 1, above) as it ends with `status`: "done", "error" or "stopped"."""
    from patchgen.runtime.onnxfile import model_sha256

    seconds, r = time.perf_counter() - run.started, run.result
    files = [] if r is None else [p for p in (r.path, r.data_path) if p is not None]
    return {**header("patchgen-export", status), "checkpoint": str(run.checkpoint),
            "request": {"precision": run.precision, "int8_activations": run.int8_activations,
                        "weights": "ema" if run.ema else "raw", "simplify": run.simplify,
                        "calibration_data": run.calibration_data},
            "parity": _parity(run, error), "parameters": None if r is None else r.parameters,
            "model_sha256": None if r is None else model_sha256(r.path),
            "seconds": {"total": seconds},
            "files": [{"path": str(p), "bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files],
            "error": None if error is None else {"message": message(error)}}


def _parity(run: ExportRecord, error: Optional[BaseException]) -> dict:
    """The parity member: the measures the export took (from its result, or from the check that failed)."""
    from patchgen.export.parity import PARITY_RMS_TOLERANCE, PARITY_TOLERANCE, ParityFailed

    r, reduced = run.result, run.precision != "fp32"
    max_error, rms_error = (None, None) if r is None else (r.parity_error, r.reduced_parity)
    prediction = None if r is None else r.prediction
    if isinstance(error, ParityFailed):  # the check that failed: its measure
        prediction = error.prediction
        if error.weights == "fp32":
            max_error = error.error
        else:
            rms_error = error.error
    return {"checked": run.check, "prediction": prediction, "max_error": _finite(max_error),
            "max_error_tolerance": PARITY_TOLERANCE, "rms_error": _finite(rms_error),
            "rms_error_tolerance": PARITY_RMS_TOLERANCE[run.precision] if reduced else None}


def _sha256(path: Path) -> str:
    """The SHA-256 of the file at `path`, as `sha256sum` prints it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
