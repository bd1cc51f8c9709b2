"""`patchgen-export`: a patchgen checkpoint -> one self-describing single-patch ONNX denoiser."""
from __future__ import annotations

from pathlib import Path

import click

from .common import CliError, Command, user_errors

EXAMPLE = """
\b
Example:
  patchgen-export runs/emoji32/checkpoint.pt -o emoji32.onnx
  patchgen-sample --model emoji32.onnx --num-images 16 --grid-image samples.png
  patchgen-export runs/emoji32/checkpoint.pt -o emoji32-int8.onnx --quantize int8
"""


@click.command(cls=Command, epilog=EXAMPLE, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The .onnx file to write.")
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
              help="fp16 and int8: calibrate and check on a built-in data set (emoji, emoji-faces, noto-emoji, ...) or a folder of images instead of "
                   "the checkpoint's own training images.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@user_errors
def main(checkpoint, output, raw_weights, no_simplify, skip_check, quantize, int8_activations, precision,
         calibration_data, force):
    """Export CHECKPOINT (from patchgen-train) to a single-patch ONNX denoiser with inputs x, t, pos, gcc
    and output eps; the file carries its grid, schedule and conditioning as metadata."""
    from patchgen.export.onnx_export import export_onnx
    from patchgen.export.parity import PARITY_RMS_TOLERANCE, PARITY_TOLERANCE

    if quantize and precision != "fp32":
        raise CliError(f"--quantize int8 and --precision {precision} are exclusive: choose one")
    if calibration_data is not None and not quantize and precision == "fp32":
        raise CliError("--calibration-data applies to --quantize int8 and --precision fp16 only")
    if int8_activations != "uint8" and not quantize:
        raise CliError("--int8-activations applies to --quantize int8 only")
    weights = quantize or precision
    report = export_onnx(checkpoint, output, ema=not raw_weights, simplify_graph=not no_simplify,
                         check=not skip_check, force=force, weights=weights, calibration_data=calibration_data,
                         int8_activations=int8_activations)
    for kind, values in (("input", report.inputs), ("output", report.outputs)):
        for name, dtype, shape in values:
            click.echo(f"  {kind:6s} {name:4s} {dtype:7s} [{', '.join(map(str, shape))}]")
    click.echo(f"  parameters {report.parameters:,}, file {report.file_bytes / 1e6:.2f} MB")
    if report.parity_error is None:
        click.echo("  parity: not checked (--skip-check)")
    else:
        click.echo(f"  parity: max error in the model's own parametrisation ({report.prediction}) = "
                   f"{report.parity_error:.2e} (limit {PARITY_TOLERANCE:g})")
    if report.reduced_parity is not None:
        click.echo(f"  {weights} parity: RMS error in the model's own parametrisation on fresh training windows "
                   f"= {report.reduced_parity:.2e} (limit {PARITY_RMS_TOLERANCE[weights]:g})")
    click.echo(f"wrote {report.path} ({weights} weights" + (f", kept beside it in {report.data_path.name}: copy both)"
                                                         if report.data_path else ")"))


if __name__ == "__main__":
    main()
