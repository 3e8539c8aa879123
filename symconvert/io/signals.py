"""SIGINT and SIGTERM as exceptions, and the short sections they must not cut in two.

The CLI runs every command inside ``raising_signals()``: SIGINT and SIGTERM raise
``Interrupted`` (a ``BaseException``, as ``KeyboardInterrupt`` is, that knows its signal),
so the ``finally`` blocks that remove half-written output run for SIGTERM as they do for
Ctrl-C, and the exit code is 128 + the signal's number (Typer would turn a
``KeyboardInterrupt`` into a silent exit 130). ``signals_deferred()`` holds a signal back for a critical
section (creating an output directory and its lock, cleaning one up, renaming a finished
file into place and recording it): the signal is raised when the section ends.

A signal the parent process ignores (``nohup``, a background job of a script) stays
ignored, as Python itself does for SIGINT.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from symconvert.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_deferred = {"depth": 0, "pending": None}


def interrupt(signum: int) -> None:
    """Raise ``Interrupted(signum)`` now, or at the end of the critical section running."""
    if _deferred["depth"]:
        _deferred["pending"] = _deferred["pending"] or signum
        return
    raise Interrupted(signum)


def _handle(signum: int, frame: object) -> None:
    interrupt(signum)


@contextlib.contextmanager
def raising_signals() -> Iterator[None]:
    """SIGINT/SIGTERM raise ``Interrupted`` inside the block (main thread only); the
    previous handlers come back after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for sig in SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, _handle)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold ``interrupt`` back until the block ends: a signal that arrives meanwhile is
    raised then (and dropped when the block fails anyway: the command is ending)."""
    _deferred["depth"] += 1
    try:
        yield
    except BaseException:
        _deferred["depth"] -= 1
        if not _deferred["depth"]:
            _deferred["pending"] = None
        raise
    _deferred["depth"] -= 1
    pending = _deferred["pending"]
    if not _deferred["depth"] and pending is not None:
        _deferred["pending"] = None
        raise Interrupted(pending)


__all__ = ["SIGNALS", "interrupt", "raising_signals", "signals_deferred"]
