"""CLI command of the report stage: ``report``."""

from __future__ import annotations

from pathlib import Path

import typer

from symconvert.cli.app import app, console, err_console
from symconvert.io.metadata import TRUST_CODE_HELP

DATA_HELP = (
    "Eval data for the accuracy rows: digits | fashion-mnist[:ROOT] | mnist:ROOT | "
    "cifar10:ROOT | cifar100:ROOT | imagefolder:ROOT. Without it, accuracy is left out "
    "(with the reason)."
)


@app.command("report")
def report_command(
    directory: Path = typer.Argument(..., help="A converted or fine-tuned model directory."),
    data: str | None = typer.Option(None, "--data", "-d", help=DATA_HELP),
    fmt: str = typer.Option("table", "--format", "-f", help="table, json or markdown."),
    plot: Path | None = typer.Option(None, "--plot", help="Also write a PNG: per-layer parameters and symmetrisation error, fine-tuning curves, accuracy."),
    compare: str | None = typer.Option(None, "--compare", help="Baselines at the same budget, comma-separated: prune (global L1 magnitude pruning of the source to the same parameter count, fine-tuned alike), dense (the source fine-tuned alike). Needs --data."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write the report to this file instead of stdout."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when available), cpu, cuda, cuda:N; used for accuracy, latency and baselines."),
    batch_size: int = typer.Option(256, "--batch-size", "-b", help="Evaluation batch size."),
    subsample: int | None = typer.Option(None, "--subsample", help="Evaluate on at most N items of the eval split (stratified, deterministic)."),
    input_size: str | None = typer.Option(None, "--input-size", help="Input size H or H,W (default: the model's pretrained config)."),
    latency_runs: int = typer.Option(10, "--latency-runs", help="Timed forward passes per model (the median is reported)."),
    latency_batch: int = typer.Option(8, "--latency-batch", help="Batch size of the latency runs."),
    workers: int = typer.Option(0, "--workers", help="Data-loading worker processes."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress lines on stderr."),
    trust_code: bool = typer.Option(False, "--trust-code", help=TRUST_CODE_HELP),
) -> None:
    """The parameter/accuracy report of a converted or fine-tuned model: parameters,
    bytes on disk, FLOPs, latency, top-1/top-5 of the source / converted / fine-tuned
    models on the same split, a per-layer table and provenance. The same numbers in every
    --format.

    Examples:

      symconvert report r18-channel/finetuned --data digits

      symconvert report r18-channel/finetuned --data digits --format json --out report.json

      symconvert report r18-channel --format markdown --plot report.png     # no accuracy

      symconvert report r18-channel/finetuned --data digits --compare prune,dense
    """
    from symconvert.checks import check_number_args
    from symconvert.io.metadata import trusting_code
    from symconvert.report.build import ReportOptions, build_report
    from symconvert.report.plot import plot_report

    _check_outputs(directory, fmt, out, plot)
    check_number_args(batch_size=batch_size, subsample=subsample, workers=workers,
                      latency_runs=latency_runs, latency_batch=latency_batch,
                      input_size=input_size)
    options = ReportOptions(data=data, device=device, batch_size=batch_size, subsample=subsample,
                            input_size=input_size, workers=workers, latency_runs=latency_runs,
                            latency_batch=latency_batch, compare=compare or (),
                            progress=progress and err_console.is_terminal)
    log = (lambda msg: err_console.print(f"[dim]report:[/] {msg}", highlight=False)) \
        if progress else None
    with trusting_code(trust_code):
        report = build_report(directory, options=options, log=log)
    _write_report(report, fmt, out)
    if plot is not None:
        path = plot_report(report, plot)
        err_console.print(f"wrote [bold]{path}[/] (plot)", highlight=False)


def _check_outputs(directory: Path, fmt: str, out: Path | None, plot: Path | None) -> None:
    """--format, --out and --plot checked before minutes of measuring, not after."""
    from symconvert.errors import SymconvertError
    from symconvert.io.checkpoint import META_NAME, WEIGHTS_NAME
    from symconvert.io.files import check_output_file
    from symconvert.report.render import FORMATS

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


def _write_report(report: dict, fmt: str, out: Path | None) -> None:
    """The report in --format, into --out or on stdout."""
    from symconvert.io.files import atomic_write_text
    from symconvert.report.render import render

    if out is not None:
        text = render(report, fmt)
        atomic_write_text(out, text + "\n")
        err_console.print(f"wrote [bold]{out}[/] ({fmt})", highlight=False)
    elif fmt == "table":
        from symconvert.report.render import render_table

        for item in render_table(report):
            console.print(item)
    else:
        # plain print: JSON and markdown must reach a pipe byte for byte, unwrapped
        print(render(report, fmt))
