"""The source model a report measures against, built at most once with weights and once
without (``SourceCache``)."""

from __future__ import annotations

from typing import Any

from torch import nn

from symconvert.errors import SymconvertError
from symconvert.models.sources import create_model_from_source, model_string


class SourceCache:
    """The source model, built at most once with weights and once without."""

    def __init__(self, source: dict[str, Any]) -> None:
        self.source = source
        self._arch: nn.Module | None = None
        self._weighted: nn.Module | None = None

    @property
    def has_weights(self) -> bool:
        return bool(self.source.get("pretrained") or self.source.get("weights"))

    def architecture(self) -> nn.Module:
        """The source architecture; weights only if already built (counting and timing do
        not need them)."""
        if self._weighted is not None:
            return self._weighted
        if self._arch is None:
            self._arch = create_model_from_source(self.source, pretrained=False).eval()
        return self._arch

    def weighted(self) -> nn.Module:
        """The source with its recorded pretrained weights / weights file, shared by the
        measurements that only read it (callers that train get their own ``fresh()``)."""
        if self._weighted is None:
            self._weighted = self.fresh().eval()
        return self._weighted

    def fresh(self) -> nn.Module:
        if not self.has_weights:
            raise SymconvertError(
                f"the source {model_string(self.source)} was converted without pretrained "
                "weights (--no-pretrained): there is no source model to measure")
        return create_model_from_source(self.source)


__all__ = ["SourceCache"]
