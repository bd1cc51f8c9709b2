"""`patchgen-export`: a patchgen checkpoint -> one self-describing single-patch ONNX denoiser."""
from __future__ import annotations

import functools
import os
from fnmatch import fnmatch
from pathlib import Path

import click

from .common import CliError, Command, user_errors
from .report import ExportRecord, export_record, reported

EXAMPLE = """
\b
Example:
  patchgen-export runs/emoji32/checkpoint.pt -o emoji32.onnx
  patchgen-sample --model emoji32.onnx --num-images 16 --grid-image samples.png
  patchgen-export runs/emoji32/checkpoint.pt -o emoji32-int8.onnx --quantize int8
  patchgen-export runs/emoji32/checkpoint.pt -o emoji32.onnx --report export.json   # the export as JSON
"""


@click.command(cls=Command, epilog=EXAMPLE, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The .onnx file to write.")
@click.option("--raw-weights", is_flag=True, help="Export the raw weights instead of the EMA weights.")
@click.option("--no-simplify", is_flag=True, help="Skip onnxsim.")
@click.option("--skip-check", is_flag=True, help="Skip the onnxruntime-vs-torch parity check (experts).")
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="Static int8 quantization (QDQ, per-channel weights), calibrated on the training images.")
@click.option("--int8-activations", type=click.Choice(["uint8", "int8"]), default="uint8", show_default=True,
              help="With --quantize int8: uint8 activations (U8S8, x86's fast path) or int8 (S8S8, try it on ARM).")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Weight precision; fp16 halves the file (inputs and outputs stay float32).")
@click.option("--calibration-data", default=None,
              help="fp16 and int8: calibrate and check on a built-in data set (emoji, emoji-faces, noto-emoji, ...) or "
                   "a folder of images instead of the checkpoint's own training images.")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write a JSON record of the export to this file, for scripts: the files written with their "
                   "sizes and SHA-256, the precision, the parity errors and their limits, seconds, or the error "
                   "(fields: the docstring of patchgen.cli.report). Written as the export ends, done or not; "
                   "replaced only with --force.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file (and --report).")
@user_errors
def main(checkpoint, output, raw_weights, no_simplify, skip_check, quantize, int8_activations, precision,
         calibration_data, report, force):
    """Export CHECKPOINT (from patchgen-train) to a single-patch ONNX denoiser with inputs x, t, pos, gcc
    and output eps; the file carries its grid, schedule and conditioning as metadata."""
    from patchgen.export.onnx_export import export_onnx

    if quantize and precision != "fp32":
        raise CliError(f"--quantize int8 and --precision {precision} are exclusive: choose one")
    if calibration_data is not None and not quantize and precision == "fp32":
        raise CliError("--calibration-data applies to --quantize int8 and --precision fp16 only")
    if int8_activations != "uint8" and not quantize:
        raise CliError("--int8-activations applies to --quantize int8 only")
    if report is not None:
        check_report(report, checkpoint, output, force)
    weights = quantize or precision
    run = ExportRecord(checkpoint, weights, int8_activations if quantize else None, ema=not raw_weights,
                       simplify=not no_simplify, check=not skip_check, calibration_data=calibration_data)
    with reported(report, functools.partial(export_record, run)):
        run.result = export_onnx(checkpoint, output, ema=not raw_weights, simplify_graph=not no_simplify,
                                 check=not skip_check, force=force, weights=weights,
                                 calibration_data=calibration_data, int8_activations=int8_activations)
    print_summary(run.result)


def print_summary(result) -> None:
    """The export's lines for people (scripts read --report): the graph's inputs and outputs, its size, the
    parity check and the file written. result: export_onnx's ExportReport."""
    from patchgen.export.parity import PARITY_RMS_TOLERANCE, PARITY_TOLERANCE

    weights = result.weights
    for kind, values in (("input", result.inputs), ("output", result.outputs)):
        for name, dtype, shape in values:
            click.echo(f"  {kind:6s} {name:4s} {dtype:7s} [{', '.join(map(str, shape))}]")
    click.echo(f"  parameters {result.parameters:,}, file {result.file_bytes / 1e6:.2f} MB")
    if result.parity_error is None:
        click.echo("  parity: not checked (--skip-check)")
    else:
        click.echo(f"  parity: max error in the model's own parametrisation ({result.prediction}) = "
                   f"{result.parity_error:.2e} (limit {PARITY_TOLERANCE:g})")
    if result.reduced_parity is not None:
        click.echo(f"  {weights} parity: RMS error in the model's own parametrisation on fresh training windows "
                   f"= {result.reduced_parity:.2e} (limit {PARITY_RMS_TOLERANCE[weights]:g})")
    click.echo(f"wrote {result.path} ({weights} weights"
               + (f", kept beside it in {result.data_path.name}: copy both)" if result.data_path else ")"))


def check_report(report: Path, checkpoint: Path, output: Path, force: bool) -> None:
    """One CliError line, before any work, where --report could not be written, would replace the checkpoint,
    the model or its weights, or an earlier report (without force)."""
    from patchgen.runtime.files import check_writable_folder

    if not report.parent.is_dir():
        raise CliError(f"--report {report}: its folder {report.parent} does not exist; create it first")
    check_writable_folder(report.parent)
    if os.path.realpath(report) == os.path.realpath(output):
        raise CliError(f"--report {report} is the -o too; choose another name for one of them")
    weights_name = fnmatch(report.name, f"{output.name}.*.data")  # onnx_file.data_name: each export replaces it
    if weights_name and os.path.realpath(report.parent) == os.path.realpath(output.parent):
        raise CliError(f"--report {report} is named as the model's weights, which the export replaces; choose "
                       "another name")
    if report.exists() and checkpoint.exists() and report.samefile(checkpoint):
        raise CliError(f"--report {report} is the checkpoint, which it would overwrite; choose another path")
    if os.path.lexists(report) and not force:
        raise CliError(f"{report} already exists and this export would replace it: pass --force to replace, or "
                       "choose another --report")


if __name__ == "__main__":
    main()
