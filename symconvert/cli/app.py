"""The command line: parse, call the library, render with rich. No logic lives here."""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Iterator

import typer
from rich.console import Console
from rich.markup import escape

from symconvert.errors import Interrupted, SymconvertError, SymconvertWarning
from symconvert.io.files import describe_os_error
from symconvert.io.signals import raising_signals

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
    # Each stage keeps its commands in its own module, which imports `app` and registers
    # them on it; the modules are imported here, when the CLI runs (not at import of this
    # module, which they import).
    for module in ("symconvert.cli.core", "symconvert.cli.export", "symconvert.cli.train",
                   "symconvert.cli.report", "symconvert.cli.run"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:  # a stage not built yet
            if exc.name != module:
                raise


def main(argv: list[str] | None = None) -> int:
    """Entry point for the `symconvert` console script and `python -m symconvert`."""
    _register_commands()
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    with raising_signals(), _warnings_shown():
        try:
            _refuse_empty_arguments(argv if argv is not None else sys.argv[1:])
            # without standalone mode click returns typer.Exit's code instead of raising it
            result = app(args=argv, standalone_mode=False)
            if isinstance(result, int) and not isinstance(result, bool):
                return result
        except SymconvertError as exc:
            if debug:
                traceback.print_exc()
            _say("[bold red]error:[/]", _message(exc))
            # the frames hold what the command built (models, DataLoader workers): let
            # them go now, not at some later garbage collection
            traceback.clear_frames(exc.__traceback__)
            return 2
        except (KeyboardInterrupt, Interrupted) as exc:
            return _interrupted(exc)
        except SystemExit as exc:  # typer.Exit raised inside a command
            return int(exc.code or 0) if not isinstance(exc.code, str) else 2
        except Exception as exc:  # click usage errors carry their own exit code
            return _other_error(exc, debug)
    return 0


def _other_error(exc: Exception, debug: bool) -> int:
    click_exc, exit_exc, abort_exc = _click_exceptions()
    if isinstance(exc, click_exc):
        _show_usage_error(exc)
        return int(getattr(exc, "exit_code", 2) or 2)
    if isinstance(exc, exit_exc):
        return int(getattr(exc, "exit_code", 0) or 0)
    if isinstance(exc, abort_exc):
        err_console.print("[yellow]aborted[/]")
        return 130
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError)
                                        and "can't allocate memory" in str(exc)):
        if debug:
            traceback.print_exc()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "MemoryError"
        _say("[bold red]error:[/]", f"not enough memory: {first} Lower the sizes asked for "
             "(--batch-size, --input-size, --num-classes, --model-kwarg).")
        return 2
    if isinstance(exc, OSError):
        # a disk that fills, a folder that cannot be written: bad input, exit 2
        if debug:
            traceback.print_exc()
        _say("[bold red]error:[/]", describe_os_error(exc))
        return 2
    if debug:
        traceback.print_exc()
    else:
        _say("[bold red]internal error:[/]", f"{type(exc).__name__}: {exc}\n"
             "Run again with --debug for the traceback, and please report it.")
    return 1


def _say(label: str, text: str) -> None:
    """``label`` (rich markup) and ``text`` as written: no markup, no emoji codes in it."""
    err_console.print(f"{label} {escape(text)}", highlight=False, emoji=False)


def _message(exc: SymconvertError) -> str:
    """The error's message; one raised in a DataLoader worker comes back wrapped in the
    worker's traceback ("Caught DataError in DataLoader worker process 0 ... Original
    Traceback ..."): its last line is the message."""
    text = str(exc)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if last.startswith(type(exc).__module__) else last
    return text


def _interrupted(exc: BaseException) -> int:
    """SIGINT/SIGTERM (``Interrupted``; a training run's ``TrainingInterrupted`` says where
    its checkpoint is): a message naming the signal, exit 128 + its number."""
    signum = getattr(exc, "signum", signal.SIGINT)
    name = signal.Signals(signum).name + (" (Ctrl-C)" if signum == signal.SIGINT else "")
    detail = str(exc)
    if detail:
        _say("[yellow]interrupted:[/]", detail)
    else:
        _say("[yellow]interrupted[/]", f"by {name}: stopped before finishing; nothing "
             "half-written is left behind (a fine-tuning run keeps its last checkpoint: rerun "
             "it with --resume). Run the command again to finish.")
    return 128 + int(signum)


@contextlib.contextmanager
def _warnings_shown() -> Iterator[None]:
    """``SymconvertWarning`` printed as ``warning: ...`` (each message once)."""
    with warnings.catch_warnings():
        warnings.simplefilter("once", SymconvertWarning)
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
            if issubclass(category, SymconvertWarning):
                _say("[yellow]warning:[/]", str(message))
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def _refuse_empty_arguments(argv: list[str]) -> None:
    """An empty value (``--out ''``) names nothing: as a path it would silently mean the
    current directory."""
    for i, arg in enumerate(argv):
        flag = arg[:-1] if arg.startswith("-") and arg.endswith("=") else None
        if arg == "" or flag:
            after = flag or (argv[i - 1] if i and argv[i - 1].startswith("-") else None)
            where = f"{after} ''" if after else "an empty argument ''"
            raise SymconvertError(f"{where}: an empty value names nothing (as a path it would "
                                  "mean the current directory); give a value, e.g. --out "
                                  "DIR, or leave the option out for its default.")


def _click_exceptions() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(ClickException, Exit, Abort) classes of click and of the copy typer >= 0.29 bundles
    (typer raises its own, which are not click's)."""
    click_exc: list[type] = []
    exit_exc: list[type] = []
    abort_exc: list[type] = []
    try:
        import click

        click_exc.append(click.exceptions.ClickException)
        exit_exc.append(click.exceptions.Exit)
        abort_exc.append(click.exceptions.Abort)
    except ImportError:  # pragma: no cover
        pass
    try:
        from typer import _click as bundled  # noqa: F401
        from typer._click import exceptions as typer_click

        click_exc.append(typer_click.ClickException)
    except ImportError:  # typer < 0.29 uses click itself
        pass
    try:
        import typer.exceptions as typer_exc

        exit_exc.append(typer_exc.Exit)
        abort_exc.append(typer_exc.Abort)
    except (ImportError, AttributeError):
        pass
    exit_exc.append(typer.Exit)
    abort_exc.append(typer.Abort)
    return tuple(click_exc), tuple(exit_exc), tuple(abort_exc)


def _show_usage_error(exc: Exception) -> None:
    """Typer's own rendering of a usage error (usage line, hint, message)."""
    try:
        from typer import rich_utils

        rich_utils.rich_format_error(exc)  # type: ignore[arg-type]
        return
    except Exception:  # noqa: BLE001  (no rich, another typer: click's plain rendering)
        pass
    exc.show()  # type: ignore[attr-defined]


def run() -> None:
    sys.exit(main())
