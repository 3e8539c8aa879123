"""``ConvertConfig``: everything ``convert`` needs besides the model, defined once.

The scheme, which layers (the selection keywords), a target reduction, the candidate
schemes of ``scheme="auto"`` and calibration. ``symconvert.convert``/``inspect`` take one
(or its fields as keywords), the CLI builds one from its flags, recipes from their
``selection`` section, and a model directory records ``to_record()`` under ``convert``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from symconvert.surgery.calib_solve import DEFAULT_DAMP
from symconvert.surgery.selection import Selection


def _option(default: Any, help: str, **bounds: float) -> Any:
    """A field with its help text and numeric bounds (``ge``/``gt``/``lt``): what a recipe's
    ``selection`` section (``symconvert.pipeline.schema``) is generated from."""
    return field(default=default, metadata={"help": help, **bounds})


@dataclass
class ConvertConfig:
    scheme: Any  # a scheme name ("channel", "eigen:8", "auto") or a Scheme
    include: list[str] | str | None = _option(
        None, "only layers whose name matches (glob or re:REGEX)")
    exclude: list[str] | str | None = _option(
        None, "skip layers whose name matches (glob or re:REGEX)")
    layers: list[str] | str | None = _option(None, "layer kinds to consider (default all)")
    min_channels: int = _option(0, "skip layers with fewer channels", ge=0)
    include_head: bool = _option(False, "also convert the classifier head")
    gates: list[str] | str | None = _option(
        None, "recurrent weights to convert: hh (default) or hh,ih")
    allow_empty: bool = _option(False, "go on even if nothing is converted")
    target_reduction: float | None = _option(
        None, "convert the cheapest layers until the model is this fraction smaller",
        gt=0.0, lt=1.0)
    schemes: list[str] | str | None = _option(  # scheme="auto": the candidates
        None, "scheme: auto — the candidate schemes (default "
        "channel,block,spatial,channel+spatial,quarter)")
    calibrate: Any = _option(  # a --data spec, a DataLoader or an input tensor
        None, "calibration data (a --data spec; its train split): fit every converted layer "
        "to the source's outputs before fine-tuning (convert --calibrate)")
    calibration_samples: int = _option(512, "calibration inputs", ge=1)
    calibration_damp: float = _option(
        DEFAULT_DAMP, "calibration: pull of each fit towards the nearest symmetric weight, "
        "relative to the layer's mean input energy (0: plain least squares)", ge=0.0)
    #: scheme="auto": {(layer, scheme): cost} or a function of the candidate pairs
    costs: Any = field(default=None, repr=False)

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

    def selection(self) -> Selection:
        return Selection.build(self.include, self.exclude, self.layers, self.min_channels,
                               self.include_head, self.gates)

    def selection_kwargs(self) -> dict[str, Any]:
        """The selection keywords alone (include … gates)."""
        return {k: getattr(self, k) for k in ("include", "exclude", "layers", "min_channels",
                                              "include_head", "gates")}

    def to_record(self) -> dict[str, Any]:
        """What a model directory records (JSON values; a loader or tensor given as
        calibration data is recorded by its type)."""
        scheme = getattr(self.scheme, "spec", self.scheme)
        record = {k: getattr(self, k) for k in ("include", "exclude", "layers", "min_channels",
                                                "include_head", "gates", "allow_empty",
                                                "target_reduction", "schemes")}
        record["scheme"] = scheme
        if self.calibrate is not None:
            data = self.calibrate
            record["calibrate"] = data if isinstance(data, str) else type(data).__name__
            record["calibration_samples"] = self.calibration_samples
            record["calibration_damp"] = self.calibration_damp
        return record
