"""The command line: parse, call the library, render with rich. No logic lives here."""

from __future__ import annotations

import os
import sys
import traceback

import typer
from rich.console import Console

from symconvert.errors import SymconvertError

app = typer.Typer(
    name="symconvert",
    help=(
        "Make pretrained PyTorch networks smaller by imposing weight symmetry.\n\n"
        "Typical use:  symconvert convert resnet101 --scheme channel --out r101-ch ;"
        "  symconvert finetune r101-ch --data imagefolder:/data/imagenet ;"
        "  symconvert report r101-ch/finetuned"
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
def _console(stderr: bool = False) -> Console:
    # piped output (logs, CI) would wrap tables at rich's 80-column default
    probe = Console(stderr=stderr)
    if probe.is_terminal or "COLUMNS" in os.environ:
        return probe
    return Console(stderr=stderr, width=140)


console = _console()
err_console = _console(stderr=True)
_state = {"debug": False}


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
) -> None:
    _state["debug"] = debug


def _register_commands() -> None:
    # Each stage keeps its commands beside its own code; importing registers them on `app`.
    import importlib

    for module in ("symconvert.cli.core", "symconvert.cli.train", "symconvert.cli.report",
                   "symconvert.cli.run"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:  # a stage not built yet
            if exc.name != module:
                raise


def main(argv: list[str] | None = None) -> int:
    """Entry point for the `symconvert` console script and `python -m symconvert`."""
    _register_commands()
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        # without standalone mode click returns typer.Exit's code instead of raising it
        result = app(args=argv, standalone_mode=False)
        if isinstance(result, int) and not isinstance(result, bool):
            return result
    except SymconvertError as exc:
        if debug:
            traceback.print_exc()
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        return 2
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        return 130
    except SystemExit as exc:  # typer.Exit raised inside a command
        return int(exc.code or 0)
    except Exception as exc:  # click usage errors carry their own exit code
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            return exc.exit_code
        if isinstance(exc, click.exceptions.Exit):
            return exc.exit_code
        if isinstance(exc, click.exceptions.Abort):
            err_console.print("[yellow]aborted[/]")
            return 130
        if debug:
            traceback.print_exc()
        else:
            err_console.print(
                f"[bold red]internal error:[/] {type(exc).__name__}: {exc}\n"
                "Run again with --debug for the traceback, and please report it.",
                highlight=False,
            )
        return 1
    return 0


def run() -> None:
    sys.exit(main())
