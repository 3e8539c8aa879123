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

from symconvert.surgery.selection import Selection


@dataclass
class ConvertConfig:
    scheme: Any  # a scheme name ("channel", "eigen:8", "auto") or a Scheme
    include: list[str] | str | None = None
    exclude: list[str] | str | None = None
    layers: list[str] | str | None = None
    min_channels: int = 0
    include_head: bool = False
    gates: list[str] | str | None = None
    allow_empty: bool = False
    target_reduction: float | None = None
    schemes: list[str] | str | None = None  # scheme="auto": the candidates
    calibrate: Any = None  # a --data spec, a DataLoader or an input tensor
    calibration_samples: int = 512
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
        return record
