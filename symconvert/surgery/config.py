"""``ConvertConfig``: everything ``convert`` needs besides the model, defined once.

The scheme, which layers (the selection keywords), a target reduction, the candidate
schemes of ``scheme="auto"`` and calibration. ``symconvert.convert``/``inspect`` take one
(or its fields as keywords), the CLI builds one from its flags, recipes from their
``selection`` section, and a model directory records ``to_record()`` under ``convert``.
Every field but ``scheme`` and ``costs`` is an option (``symconvert.options``): its flag of
``symconvert convert``/``inspect`` and its recipe key are generated from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from symconvert.checks import resolve_device
from symconvert.options import Options, option
from symconvert.surgery.auto import DEFAULT_SCHEMES, parse_schemes
from symconvert.surgery.calib_blocks import DEFAULT_STEPS
from symconvert.surgery.calib_solve import DEFAULT_DAMP
from symconvert.surgery.selection import Selection, parse_gates, parse_layer_kinds

#: the selection keywords (``Selection.build``'s)
SELECTION_FIELDS = ("include", "exclude", "layers", "min_channels", "include_head", "gates")


@dataclass
class ConvertConfig(Options):
    scheme: Any  # a scheme name ("channel", "eigen:8", "auto") or a Scheme
    include: list[str] | str | None = option(
        None, "Only layers whose name matches (glob, or re:REGEX).", many="repeat")
    exclude: list[str] | str | None = option(
        None, "Skip layers whose name matches (glob, or re:REGEX).", many="repeat")
    layers: list[str] | str | None = option(
        None, "Layer kinds to consider: conv,linear,rnn (default all).", many="comma",
        text_type=str, check=parse_layer_kinds)
    min_channels: int = option(0, "Skip layers with fewer channels.", ge=0)
    include_head: bool = option(False, "Also convert the classifier head.")
    gates: list[str] | str | None = option(
        None, "RNN weights: hh (default) or hh,ih.", many="comma", text_type=str,
        check=parse_gates)
    allow_empty: bool = option(False, "Go on (write the model) even if nothing is converted.")
    target_reduction: float | None = option(
        None, "Convert the cheapest layers until the model is this fraction smaller "
        "(e.g. 0.25).", gt=0.0, lt=1.0)
    schemes: list[str] | str | None = option(
        None, "With --scheme auto: the candidate schemes, comma-separated (default "
        f"{','.join(DEFAULT_SCHEMES)}; e.g. channel,block,eigen:16).", many="comma",
        text_type=str, check=parse_schemes)
    calibrate: Any = option(  # a --data spec, a DataLoader or an input tensor
        None, "Calibration data (any --data spec; its train split): fit every converted layer "
        "to the source layer's output on real inputs and re-estimate BatchNorm statistics, "
        "so the model works before fine-tuning. With --target-reduction, layers are ranked "
        "by this calibrated output error.", text_type=str)
    calibration_samples: int = option(
        512, "Number of calibration inputs (drawn from the train split, seeded).", ge=1)
    calibration_damp: float = option(
        DEFAULT_DAMP, "Pull of each calibrated fit towards the nearest symmetric weight, "
        "relative to the layer's mean input energy; keeps the fit from over-fitting its "
        "samples (0: plain least squares).", ge=0.0)
    calibration_mode: str = option(
        "block", "layer: fit each converted layer alone (least squares); block: then refine "
        "each block against the source block's output (--calibration-steps per block).",
        choices=("layer", "block"))
    calibration_steps: int = option(
        DEFAULT_STEPS, "Block-wise calibration: Adam steps per block (a residual block, a "
        "transformer layer) refining its layers together to reproduce the source block's "
        "output, after their least-squares fits (0: fit layer by layer only).", ge=0)
    calibration_blocks: str | None = option(
        None, "Block-wise calibration: refine the modules whose name matches (glob, or "
        "re:REGEX; the outermost where matches nest) instead of the residual blocks / "
        "transformer layers found.", text_type=str)
    device: str = option(
        "auto", "Where calibration computes: auto (CUDA when available), cpu, cuda, cuda:N. "
        "The model is written from the CPU either way.", text_type=str, check=resolve_device)
    #: scheme="auto": {(layer, scheme): cost} or a function of the candidate pairs
    costs: Any = field(default=None, repr=False)
    target_flops: float | None = option(
        None, "With --scheme auto: choose per layer the schemes (or none) whose fast forms "
        "bring the model to this fraction of the source's FLOPs (e.g. 0.6) at the least "
        "weight error; see inspect's FLOPs column.", gt=0.0, lt=1.0)
    #: target_flops: an example input to count each layer's FLOPs on (the CLI gives the
    #: task's example input)
    flops_input: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name in ("include", "exclude"):  # no filter: None, whatever spelling
            if not getattr(self, name):
                setattr(self, name, None)
        super().__post_init__()

    @classmethod
    def of(cls, scheme: Any, **options: Any) -> ConvertConfig:
        """A config from a scheme (or a config) and keyword overrides; an unknown keyword
        is a TypeError, as for any Python function."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"convert() got an unexpected keyword argument {unknown[0]!r} "
                            f"(known: {', '.join(sorted(names - {'scheme'}))})")
        if isinstance(scheme, ConvertConfig):
            return dataclasses.replace(scheme, **options)
        return cls(scheme=scheme, **options)

    def block_steps(self) -> int:
        """Adam steps per block calibration runs (0 with ``calibration_mode="layer"``)."""
        return 0 if self.calibration_mode == "layer" else self.calibration_steps

    def selection(self) -> Selection:
        return Selection.build(**self.selection_kwargs())

    def selection_kwargs(self) -> dict[str, Any]:
        """The selection keywords alone (include … gates)."""
        return {k: getattr(self, k) for k in SELECTION_FIELDS}

    def to_record(self) -> dict[str, Any]:
        """What a model directory records (JSON values; a loader or tensor given as
        calibration data is recorded by its type)."""
        scheme = getattr(self.scheme, "spec", self.scheme)
        record = {k: getattr(self, k) for k in (*SELECTION_FIELDS, "allow_empty",
                                                "target_reduction", "schemes")}
        if self.target_flops is not None:
            record["target_flops"] = self.target_flops
        record["scheme"] = scheme
        if self.calibrate is not None:
            data = self.calibrate
            record["calibrate"] = data if isinstance(data, str) else type(data).__name__
            record["calibration_samples"] = self.calibration_samples
            record["calibration_damp"] = self.calibration_damp
            record["calibration_mode"] = self.calibration_mode
            record["calibration_steps"] = self.block_steps()
            if self.calibration_blocks is not None:
                record["calibration_blocks"] = self.calibration_blocks
        return record


__all__ = ["SELECTION_FIELDS", "ConvertConfig"]
