"""Numbers and names a command takes outside the stage configs, checked before it creates
or loads anything; the last guard before weights reach a file.

The stage options (``ConvertConfig``, ``FinetuneConfig``, ``ReportOptions``,
``ExportOptions``) check themselves (``symconvert.options``). What is left here: the flags of
``evaluate`` and the model's (``check_number_args``), ``--format`` (``check_format``),
``--input-size`` (``parse_input_size``), ``--device`` (``resolve_device``) and
``require_finite(model, what)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from symconvert.errors import DataError, SymconvertError, TrainingError
from symconvert.options import Option, check_value

MAX_CLASSES = 10_000_000
MAX_INPUT_SIZE = 8192

#: the numeric flags outside the stage configs
_NUMBERS = {
    "batch_size": (Option("", ge=1), "int"),
    "subsample": (Option("", ge=1), "int"),
    "workers": (Option("", ge=0), "int"),
    "num_classes": (Option("", ge=1), "int"),
}


def check_number_args(**flags: Any) -> None:
    """Every known numeric flag whole and in range (``None`` means "default"), and
    ``input_size`` parsable."""
    for name, value in flags.items():
        if name == "input_size":
            parse_input_size(value)
        elif name in _NUMBERS:
            spec, kind = _NUMBERS[name]
            check_value(name, spec, value, kind)
    if flags.get("num_classes") is not None and flags["num_classes"] > MAX_CLASSES:
        raise SymconvertError(f"--num-classes {flags['num_classes']}: at most {MAX_CLASSES:,}")


def check_format(fmt: str, formats: Sequence[str], flag: str = "--format") -> None:
    if fmt not in formats:
        raise SymconvertError(f"{flag} {fmt!r}: choose {' or '.join(formats)}")


def parse_input_size(value: int | str | Sequence[int] | None) -> tuple[int, int] | None:
    """``224`` / ``"224"`` / ``"160,128"`` / ``(3,160,128)`` → ``(H, W)``."""
    if value is None:
        return None
    if isinstance(value, int):
        parts = [value]
    elif isinstance(value, str):
        try:
            parts = [int(p) for p in value.replace("x", ",").split(",") if p.strip()]
        except ValueError:
            parts = []
    else:
        parts = [int(p) for p in value]
        if len(parts) == 3:
            parts = parts[1:]
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise DataError(f"--input-size {value!r}: expected H or H,W (positive integers), "
                        "e.g. --input-size 224 or --input-size 160,128")
    if max(parts) > MAX_INPUT_SIZE:
        raise DataError(f"--input-size {value!r}: at most {MAX_INPUT_SIZE} pixels a side")
    return parts[0], parts[1]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; anything else as torch spells it."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise SymconvertError(f"--device {device!r}: not a device torch knows "
                              "(use auto, cpu, cuda or cuda:N)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SymconvertError(f"--device {device}: CUDA is not available here; use --device cpu")
    return dev


#: what ``require_finite`` suggests when it refuses
DIVERGED_HINT = ("The weights are damaged, or the run that produced them diverged: lower "
                 "--lr, keep gradient clipping on, or try --no-amp.")


def non_finite(model: Any) -> str | None:
    """The first tensor of ``model`` a file must not hold: a parameter or a normalisation
    statistic with NaN/inf, or any other floating buffer with NaN (a buffer may hold -inf
    or inf on purpose: attention masks)."""
    for prefix, module in model.named_modules():
        strict_buffers = isinstance(module, torch.nn.modules.batchnorm._NormBase)
        tensors = [(n, t, True) for n, t in module.named_parameters(recurse=False)]
        tensors += [(n, t, strict_buffers) for n, t in module.named_buffers(recurse=False)]
        for name, tensor, strict in tensors:
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() \
                    or tensor.is_meta:
                continue
            bad = ~torch.isfinite(tensor) if strict else torch.isnan(tensor)
            if bool(bad.any()):
                return f"{prefix}.{name}" if prefix else name
    return None


def require_finite(model: Any, what: str, hint: str = DIVERGED_HINT) -> None:
    """Refuse to write weights with NaN/inf in them (``non_finite``): every writer (model
    directory, export, training checkpoint) asks this before it writes."""
    name = non_finite(model)
    if name is not None:
        raise TrainingError(f"{name} holds non-finite values (NaN/inf), so {what} is not "
                            f"written. {hint}")


__all__ = ["DIVERGED_HINT", "MAX_CLASSES", "MAX_INPUT_SIZE", "check_format",
           "check_number_args", "non_finite", "parse_input_size", "require_finite",
           "resolve_device"]
