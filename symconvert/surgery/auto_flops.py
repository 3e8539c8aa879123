"""``--scheme auto --target-flops F``: the knapsack of ``symconvert.surgery.auto`` with
FLOPs saved as the gain. Each layer's dense FLOPs are counted once on an example input
(torch's flop counter, per module); a scheme saves ``(1 - flops_ratio)`` of them, its
fast form's ratio (``Scheme.fast_ratio``: 4x for flip, 2x for quarter, ...); a scheme
without a fast form saves none and is never chosen for FLOPs. The goal is
``(1 - F) * total`` FLOPs saved, the cost the default weight error² (calibration does
not price FLOPs plans yet)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from symconvert.errors import SymconvertError


@dataclass
class FlopsTarget:
    """``fraction`` of the source's ``total`` FLOPs, and every module's dense FLOPs."""

    fraction: float
    total: int
    per_module: dict[str, int]

    @property
    def goal(self) -> int:
        """FLOPs the conversion must save."""
        return math.ceil((1.0 - self.fraction) * self.total - 1e-9)

    def gain(self, module: str, flops_ratio: float) -> int:
        return int(self.per_module.get(module, 0) * (1.0 - flops_ratio))


def module_flops(model: nn.Module, example) -> tuple[int, dict[str, int]]:
    """FLOPs of one forward on ``example`` (a tensor or a tuple of inputs), in total and per
    module name."""
    counter = FlopCounterMode(display=False)
    inputs = example if isinstance(example, tuple) else (example,)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), counter:
            model(*inputs)
    finally:
        model.train(was_training)
    root = type(model).__name__
    per = {}
    for key, ops in counter.get_flop_counts().items():
        if key.startswith(root + "."):
            per[key[len(root) + 1:]] = int(sum(ops.values()))
    return int(counter.get_total_flops()), per


def flops_target(model: nn.Module, config) -> FlopsTarget | None:
    """The FLOPs goal of ``config`` (``target_flops``, ``flops_input``), or None."""
    if config.target_flops is None:
        return None
    if config.target_reduction is not None:
        raise SymconvertError("give --target-reduction or --target-flops, not both.")
    if config.flops_input is None:
        raise SymconvertError("target_flops= needs flops_input=, an example input of the model "
                              "(the CLI uses the task's example input).")
    if config.calibrate is not None:
        raise SymconvertError("--target-flops with --calibrate is not supported yet: plan "
                              "with --target-flops, then convert that plan's schemes.")
    total, per = module_flops(model, config.flops_input)
    if not total:
        raise SymconvertError("the model ran no counted FLOPs on its example input.")
    return FlopsTarget(config.target_flops, total, per)


__all__ = ["FlopsTarget", "flops_target", "module_flops"]
