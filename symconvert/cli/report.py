"""CLI command of the report stage: ``report`` (its measuring options are ``ReportOptions``'s)."""

from __future__ import annotations

from pathlib import Path

import typer

from symconvert.cli.app import app, console, err_console
from symconvert.cli.options import with_options
from symconvert.errors import SymconvertError
from symconvert.io.files import META_NAME, WEIGHTS_NAME, atomic_write_text, check_output_file
from symconvert.io.metadata import TRUST_CODE_HELP, trusting_code
from symconvert.report import build
from symconvert.report.options import ReportOptions
from symconvert.report.plot import plot_report
from symconvert.report.render import FORMATS, Report, render, render_table


@app.command("report")
@with_options(ReportOptions)
def report_command(
    directory: Path = typer.Argument(..., help="A converted or fine-tuned model directory."),
    fmt: str = typer.Option("table", "--format", "-f", help="table, json or markdown."),
    plot: Path | None = typer.Option(None, "--plot", help="Also write a PNG: per-layer parameters and symmetrisation error, fine-tuning curves, accuracy."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write the report to this file instead of stdout."),
    config: dict = None,  # --data … --compare (ReportOptions)
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress lines on stderr."),
    trust_code: bool = typer.Option(False, "--trust-code", help=TRUST_CODE_HELP),
) -> None:
    """The parameter/accuracy report of a converted or fine-tuned model: parameters,
    bytes on disk, FLOPs, latency, top-1/top-5 (or the model's task's scores) of the source /
    converted / fine-tuned models on the same split, a per-layer table and provenance. The
    same numbers in every --format.

    Examples:

      symconvert report r18-channel/finetuned --data digits

      symconvert report r18-channel/finetuned --data digits --format json --out report.json

      symconvert report r18-channel --format markdown --plot report.png     # no accuracy

      symconvert report r18-channel/finetuned --data digits --compare prune,dense
    """
    options = ReportOptions(**config, progress=progress and err_console.is_terminal)
    _check_outputs(directory, fmt, out, plot)
    log = (lambda msg: err_console.print(f"[dim]report:[/] {msg}", highlight=False)) \
        if progress else None
    with trusting_code(trust_code):
        report = build.build_report(directory, options=options, log=log)
    _write_report(report, fmt, out)
    if plot is not None:
        path = plot_report(report, plot)
        err_console.print(f"wrote [bold]{path}[/] (plot)", highlight=False)


def _check_outputs(directory: Path, fmt: str, out: Path | None, plot: Path | None) -> None:
    """--format, --out and --plot checked before minutes of measuring, not after."""
    if fmt not in FORMATS:
        raise SymconvertError(f"--format {fmt!r}: choose from {', '.join(FORMATS)}.")
    if plot is not None and plot.suffix.lower() != ".png":
        raise SymconvertError(f"--plot {plot}: write a .png file (e.g. --plot report.png).")
    for flag, path in (("--out", out), ("--plot", plot)):
        if path is not None and not path.absolute().parent.is_dir():
            raise SymconvertError(f"{flag} {path}: the folder {path.absolute().parent} does not "
                                  "exist; create it or choose another path.")
        if path is not None and path.is_dir():
            raise SymconvertError(f"{flag} {path} is a directory; give a file name.")
        if path is not None:  # writable, and not the model being reported on
            check_output_file(path, [directory, directory / WEIGHTS_NAME,
                                     directory / META_NAME], flag=flag)
    if out is not None and plot is not None and out.absolute() == plot.absolute():
        raise SymconvertError(f"--out and --plot are both {out}; give two files.")


def _write_report(report: Report, fmt: str, out: Path | None) -> None:
    """The report in --format, into --out or on stdout."""
    if out is not None:
        atomic_write_text(out, render(report, fmt) + "\n")
        err_console.print(f"wrote [bold]{out}[/] ({fmt})", highlight=False)
    elif fmt == "table":
        for item in render_table(report):
            console.print(item)
    else:
        # plain print: JSON and markdown must reach a pipe byte for byte, unwrapped
        print(render(report, fmt))
