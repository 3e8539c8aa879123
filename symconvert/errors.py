"""Errors users can act on. The CLI turns every ``SymconvertError`` into exit code 2."""

from __future__ import annotations


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
