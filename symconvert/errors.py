"""Errors users can act on. The CLI turns every ``SymconvertError`` into exit code 2."""

from __future__ import annotations

import signal


class SymconvertError(Exception):
    """Bad input: the message says what was wrong and what to do next."""


class UnknownModelError(SymconvertError):
    """A MODEL string that names nothing timm, torchvision or Python can build."""


class UnknownSchemeError(SymconvertError):
    """A scheme name that is not registered."""


class NothingEligibleError(SymconvertError):
    """The selection converts no layer (pass ``allow_empty=True`` to accept that)."""


class WeightsError(SymconvertError):
    """Pretrained weights that cannot be found or read safely."""


class CheckpointError(SymconvertError):
    """A converted-model directory that is missing, corrupt or from an unknown format."""


class DataError(SymconvertError):
    """A ``--data`` spec whose files are missing or laid out wrongly."""


class RecipeError(SymconvertError):
    """A recipe that does not validate; the message names the key."""


class TrainingError(SymconvertError):
    """Fine-tuning that cannot go on (non-finite loss, corrupt checkpoint)."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM: the command stops, cleans up what it was writing, and exits
    128 + the signal number (130, 143) with a message naming the signal. Like
    ``KeyboardInterrupt`` it is no ``Exception`` (no ``except Exception`` swallows it), and
    unlike it, Typer does not turn it into a silent exit 130."""

    def __init__(self, signum: int, message: str = "") -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class SymconvertWarning(UserWarning):
    """Input that works but deserves a word (a tiny data set); the CLI prints it as
    ``warning: ...``."""
