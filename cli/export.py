"""`patchgen-export`: a patchgen checkpoint -> one self-describing single-patch ONNX denoiser."""
from __future__ import annotations

from pathlib import Path

import click

from .common import Command, user_errors

EXAMPLE = """
\b
Example:
  patchgen-export runs/emoji32/checkpoint.pt -o emoji32.onnx
  patchgen-sample --model emoji32.onnx --num-images 16 --grid-image samples.png
"""


@click.command(cls=Command, epilog=EXAMPLE, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The .onnx file to write.")
@click.option("--raw-weights", is_flag=True, help="Export the raw weights instead of the EMA weights.")
@click.option("--no-simplify", is_flag=True, help="Skip onnxsim.")
@click.option("--skip-check", is_flag=True, help="Skip the onnxruntime-vs-torch parity check (experts).")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@user_errors
def main(checkpoint, output, raw_weights, no_simplify, skip_check, force):
    """Export CHECKPOINT (from patchgen-train) to a single-patch ONNX denoiser with inputs x, t, pos, gcc
    and output eps; the file carries its grid, schedule and conditioning as metadata."""
    from patchgen.export.onnx_export import PARITY_TOLERANCE, export_onnx

    report = export_onnx(checkpoint, output, ema=not raw_weights, simplify_graph=not no_simplify,
                         check=not skip_check, force=force)
    for kind, values in (("input", report.inputs), ("output", report.outputs)):
        for name, dtype, shape in values:
            click.echo(f"  {kind:6s} {name:4s} {dtype:7s} [{', '.join(map(str, shape))}]")
    click.echo(f"  parameters {report.parameters:,}, file {report.file_bytes / 1e6:.2f} MB")
    if report.parity_error is None:
        click.echo("  parity: not checked (--skip-check)")
    else:
        click.echo(f"  parity: max error in the model's own parametrisation ({report.prediction}) = "
                   f"{report.parity_error:.2e} (limit {PARITY_TOLERANCE:g})")
    click.echo(f"wrote {report.path}")


if __name__ == "__main__":
    main()
