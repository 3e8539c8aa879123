"""Which modules can be converted, and how each one's weights are seen by a scheme.

A handler is registered per layer kind (``conv``, ``linear``, ``rnn``): it says whether a
module is of its kind and lists the module's convertible tensors with the shape and the
number of square blocks (``groups``) a scheme should see. Adding a layer type is one
handler in its own module and one import line in ``symconvert/surgery/__init__.py``
(``rnn.py`` and ``attention.py`` are such modules).

The facts calibration needs live on the handler too: ``calibration`` names the fitter of
the kind (``"conv"``: y = W * x by unfolding, ``"linear"``: y = W x, ``"attention"``: the
q/k/v input projections of nn.MultiheadAttention, ``"recurrent"``: RNN gate blocks; None:
not fitted) and ``calibratable(module, tensor)`` says whether a converted tensor is fitted.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from symconvert.surgery.fast import install


@dataclass(frozen=True)
class TensorTarget:
    """One tensor a scheme may replace: ``module.<tensor>`` viewed as ``shape``."""

    tensor: str
    shape: tuple[int, ...]
    groups: int = 1
    #: set when the handler itself rules the tensor out (the scheme is not asked)
    reason: str | None = None


class LayerHandler:
    kind: str = ""
    #: the calibration fitter of this kind (see the module doc); None: not calibrated
    calibration: str | None = None

    def calibratable(self, module: nn.Module, tensor: str) -> bool:
        """Whether calibration fits the converted ``module.<tensor>``."""
        return self.calibration is not None

    def matches(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def targets(self, module: nn.Module, options: dict) -> Iterator[TensorTarget]:
        raise NotImplementedError

    def after_convert(self, module: nn.Module) -> None:
        """Called once a module's tensors are parametrized (e.g. refresh RNN flat weights)."""

    def after_fold(self, module: nn.Module) -> None:
        """Called once a module's parametrizations are removed."""


_HANDLERS: list[LayerHandler] = []


def register_layer_handler(handler: LayerHandler) -> LayerHandler:
    _HANDLERS.append(handler)
    return handler


def handler_for(module: nn.Module) -> LayerHandler | None:
    for handler in _HANDLERS:
        if handler.matches(module):
            return handler
    return None


def layer_kinds() -> list[str]:
    return list(dict.fromkeys(h.kind for h in _HANDLERS))  # several handlers may share one


class ConvHandler(LayerHandler):
    """Conv1d/2d/3d and every subclass (timm's StdConv2d, Conv2dSame, ...): the subclass
    keeps its own forward, which reads ``self.weight``."""

    kind = "conv"
    calibration = "conv"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.modules.conv._ConvNd)

    def calibratable(self, module: nn.Module, tensor: str) -> bool:
        return tensor == "weight" and not getattr(module, "transposed", False)

    def targets(self, module: nn.Module, options: dict) -> Iterator[TensorTarget]:
        weight = module.weight
        shape = tuple(weight.shape)
        if getattr(module, "transposed", False):
            yield TensorTarget("weight", shape, module.groups, "transposed convolution")
            return
        yield TensorTarget("weight", shape, module.groups)

    def after_convert(self, module: nn.Module) -> None:
        install(module)  # the scheme's fast form, where it has one


class LinearHandler(LayerHandler):
    kind = "linear"
    calibration = "linear"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    def calibratable(self, module: nn.Module, tensor: str) -> bool:
        return tensor == "weight"

    def targets(self, module: nn.Module, options: dict) -> Iterator[TensorTarget]:
        yield TensorTarget("weight", tuple(module.weight.shape), 1)

    def after_convert(self, module: nn.Module) -> None:
        install(module)


register_layer_handler(ConvHandler())
register_layer_handler(LinearHandler())
