"""CLI command of the artifact stage: ``export`` (its options are ``ExportOptions``'s; the
formats are the registry of ``symconvert.io.export``)."""

from __future__ import annotations

from pathlib import Path

import typer

import symconvert
from symconvert.cli.app import app, console
from symconvert.cli.options import with_options
from symconvert.io import export as exports
from symconvert.io.export import ExportOptions
from symconvert.io.files import META_NAME, WEIGHTS_NAME, check_output_file, refuse_inputs
from symconvert.io.metadata import TRUST_CODE_HELP


@app.command("export")
@with_options(ExportOptions)
def export_command(
    directory: Path = typer.Argument(..., help="A converted (or fine-tuned) model directory."),
    out: Path = typer.Option(..., "--out", "-o", help="Output file."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
    config: dict = None,  # --format, --packed, --dtype (ExportOptions)
    trust_code: bool = typer.Option(False, "--trust-code", help=TRUST_CODE_HELP),
) -> None:
    """Fold the symmetry back into plain dense weights of the ORIGINAL architecture and
    write them: `dense` is a safetensors state_dict loadable by plain timm/torchvision;
    `onnx`/`torchscript` with `--packed` keep the file as small as the model directory.

    Examples:

      symconvert export r101-channel --format dense --out r101-dense.safetensors

      symconvert export r101-channel --format onnx --out r101.onnx

      symconvert export r101-channel --format onnx --packed --out r101-packed.onnx

      symconvert export r101-channel --format torchscript --packed --dtype float16 --out r101.pt
    """
    options = ExportOptions(**config)  # format, --packed and --dtype checked before loading
    # an --out that is the model being exported is refused even with --overwrite
    refuse_inputs(out, [directory, directory / WEIGHTS_NAME, directory / META_NAME])
    if out.absolute().parent.is_dir():  # export creates a missing folder itself
        check_output_file(out, overwrite=overwrite)
    model = symconvert.load(directory, trust_code=trust_code)
    path = exports.export(model, options.format, out, overwrite=overwrite,
                          packed=options.packed, dtype=options.dtype)
    kind = f"{options.format}{', packed' if options.packed else ''}, {options.dtype}"
    console.print(f"wrote [bold]{path}[/] ({path.stat().st_size:,} bytes, {kind})")
