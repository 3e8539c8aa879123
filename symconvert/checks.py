"""Numbers a command takes, checked before it creates or loads anything.

``check_finetune_args(**flags)`` is called by the ``finetune`` command and by
``symconvert.train.run.finetune`` (the API) first thing; ``require_finite(model, what)`` is the
last guard before weights reach a file (a checkpoint, a model directory).
"""

from __future__ import annotations

import math
from typing import Any

from symconvert.errors import SymconvertError, TrainingError

MAX_CLASSES = 10_000_000

#: flag -> (lowest allowed, strictly above it?)
_FLOATS = {
    "lr": (0.0, True),
    "weight_decay": (0.0, False),
    "warmup_epochs": (0.0, False),
    "min_lr": (0.0, False),
    "decay_rate": (0.0, True),
    "momentum": (0.0, False),
    "clip_grad": (0.0, False),
    "distill_alpha": (0.0, False),
    "distill_temperature": (0.0, True),
    "calibration_damp": (0.0, False),
}
_INTS = {
    "epochs": 1,
    "batch_size": 1,
    "checkpoint_every": 0,
    "workers": 0,
    "subsample": 1,
    "num_classes": 1,
    "seed": 0,
    "latency_runs": 1,
    "latency_batch": 1,
    "min_channels": 0,
    "log_interval": 0,
    "bptt": 1,
    "calibration_samples": 1,
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_number_args(**flags: Any) -> None:
    """Every known numeric flag finite and in range; ``None`` means "default"."""
    for name, value in flags.items():
        if value is None or isinstance(value, bool):
            continue
        if name in _FLOATS:
            low, strict = _FLOATS[name]
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise SymconvertError(f"{_flag(name)} {value!r}: expected a number") from None
            if not math.isfinite(number):
                raise SymconvertError(f"{_flag(name)} {value}: must be a finite number")
            if number < low or (strict and number == low):
                rel = "greater than" if strict else "at least"
                raise SymconvertError(f"{_flag(name)} {value}: must be {rel} {low:g}")
        elif name in _INTS:
            if not isinstance(value, int):
                raise SymconvertError(f"{_flag(name)} {value!r}: expected a whole number")
            if value < _INTS[name]:
                raise SymconvertError(f"{_flag(name)} {value}: must be at least {_INTS[name]}")
    if flags.get("num_classes") is not None and flags["num_classes"] > MAX_CLASSES:
        raise SymconvertError(f"--num-classes {flags['num_classes']}: at most {MAX_CLASSES:,}")
    if flags.get("input_size") is not None:
        from symconvert.tasks.data import parse_input_size

        parse_input_size(flags["input_size"])
    fmt = flags.get("fmt")
    if fmt is not None and flags.get("formats") and fmt not in flags["formats"]:
        raise SymconvertError(f"--format {fmt!r}: choose {' or '.join(flags['formats'])}")
    if flags.get("distill_alpha") is not None and float(flags["distill_alpha"]) > 1:
        raise SymconvertError(f"--distill-alpha {flags['distill_alpha']}: must be in [0, 1]")
    milestones = flags.get("decay_milestones")
    if isinstance(milestones, str) and milestones.strip():
        for part in milestones.split(","):
            part = part.strip()
            if part and (not part.isdigit()):
                raise SymconvertError(f"--decay-milestones {milestones!r}: expected epochs such "
                                      "as 60,120,160 (whole numbers >= 0)")


def check_finetune_args(**flags: Any) -> None:
    """The finetune flags (``FinetuneConfig`` fields and the command's own)."""
    check_number_args(**flags)


def require_finite(model: Any, what: str) -> None:
    """Refuse to write weights with NaN/inf in them (a diverged run)."""
    import torch

    # parameters only: a persistent buffer may hold -inf on purpose (attention masks)
    for name, tensor in model.named_parameters():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() \
                and not tensor.is_meta and not bool(torch.isfinite(tensor).all()):
            raise TrainingError(
                f"{name} holds non-finite values (NaN/inf), so {what} is not written (a "
                "training run diverged: its last good checkpoint is kept; lower --lr, keep "
                "gradient clipping on, or try --no-amp).")


__all__ = ["check_finetune_args", "check_number_args", "require_finite"]
