"""The public verbs of surgery as ``symconvert`` exports them: ``inspect`` (the plan, nothing
changed) and ``convert`` (plain, ``scheme="auto"``, or calibrated on data)."""

from __future__ import annotations

from typing import Any

from torch import nn

from symconvert.errors import SymconvertError
from symconvert.schemes import Scheme
from symconvert.surgery.auto import require_reachable
from symconvert.surgery.calib_costs import convert_calibrated
from symconvert.surgery.config import ConvertConfig
from symconvert.surgery.convert import apply_plan, inspect
from symconvert.surgery.plan import Plan


def convert(model: nn.Module, scheme: str | Scheme | ConvertConfig, /,
            **options: Any) -> tuple[nn.Module, Plan]:
    """Replace every selected, eligible weight by its symmetric parametrization, in place.

    Takes a ``ConvertConfig`` or its fields as keywords: the selection (``include``,
    ``exclude``, ``layers``, ``min_channels``, ``include_head``, ``gates``),
    ``allow_empty``, ``target_reduction``, ``schemes``/``costs`` (``scheme="auto"``) and
    ``calibrate``/``calibration_samples``/``calibration_damp``/``calibration_mode``/
    ``calibration_steps``/``calibration_blocks``/``device``;
    ``target_flops`` with ``flops_input`` (``scheme="auto"``: a FLOPs target met by the
    schemes' fast forms).

    Each weight is initialised from the Frobenius-nearest symmetric weight and the dense
    original is dropped: the module keeps only the packed free parameters
    (``<layer>.parametrizations.weight.original``). Returns ``(model, plan)``.
    ``scheme="auto"``: see ``inspect``; an unreachable ``target_reduction`` is an error.

    ``calibrate`` (a ``--data`` spec, loader or input tensor): then fit every converted
    layer to the source layer's output on ``calibration_samples`` inputs and re-estimate
    BatchNorm statistics (``symconvert.surgery.calibrate``); the plan records the per-layer
    ``output_error``. With ``target_reduction`` (or ``scheme="auto"``), layers are then
    ranked by their calibrated output error instead of the weight error.
    """
    config = ConvertConfig.of(scheme, **options)
    if config.calibrate is not None and config.target_flops is not None:
        raise SymconvertError("--target-flops with --calibrate is not supported yet: plan "
                              "with --target-flops, then convert that plan's schemes.")
    if config.calibrate is not None:
        return convert_calibrated(model, config.scheme, config.calibrate,
                                  config.calibration_samples, damp=config.calibration_damp,
                                  steps=config.block_steps(), device=config.device,
                                  blocks=config.calibration_blocks,
                                  allow_empty=config.allow_empty,
                                  target_reduction=config.target_reduction,
                                  schemes=config.schemes, costs=config.costs,
                                  **config.selection_kwargs())
    # the error is measured while attaching (one pack per layer instead of two), unless
    # --target-reduction needs it to choose the layers
    plan = inspect(model, config, _with_error=config.target_reduction is not None)
    require_reachable(plan)
    apply_plan(model, plan)
    return model, plan


__all__ = ["convert", "inspect"]
