"""Converted convs and linears run their scheme's fast form (``symconvert.schemes.fast``).

``install`` (called by the conv and linear handlers' ``after_convert``) gives the layer's
parametrized class (``torch.nn.utils.parametrize`` makes one per module) a forward that
computes from the packed tensor with fewer multiply-adds: flip and eighth 4x, quarter 2x,
repeat:R R x, eigen:K n/2K x. The parametrization, state_dict names and checkpoints do
not change; ``fold`` removes the class, so a folded model runs its own dense forward.
The fast form is built from the packed tensor with differentiable ops, so it is exact in
training too (gradients equal the dense form's to float rounding); in evaluation its
small weights are cached like ``Symmetric``'s dense one.

The dense forward runs instead when the layer has no fast form (channel, spatial,
channel+spatial, block; grouped repeat; eigen with 2K >= n; a subclass with its own
forward, such as timm's StdConv2d; a transposed conv), inside ``dense_forward()``, or
after ``set_fast(model, False)``. ``fast_reason`` says which.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from symconvert.schemes.fast import ChannelMaps, TapFactors

_PLAIN = {nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward, nn.Linear.forward}
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_STATE = {"enabled": True}
FLAG = "symconvert_fast"
_CACHE = "symconvert_fast_cache"


def _base(module: nn.Module) -> type:
    """The class the parametrization subclassed (the layer's own class)."""
    cls = type(module)
    return cls.__bases__[0] if parametrize.is_parametrized(module) else cls


def _entry(module: nn.Module):
    """The single Symmetric-like transform (``.scheme``, ``.shape``, ``.groups``) on the
    weight, and the weight's ParametrizationList, or (None, None)."""
    plist = getattr(getattr(module, "parametrizations", None), "weight", None)
    if plist is None or len(plist) != 1 or getattr(plist[0], "scheme", None) is None:
        return None, None
    return plist[0], plist


def fast_reason(module: nn.Module) -> str | None:
    """Why ``module`` runs dense; None when it runs its fast form."""
    sym, _ = _entry(module)
    if sym is None:
        return "weight not converted (or more than one parametrization on it)"
    return layer_fast_reason(module, sym.scheme, sym.shape, sym.groups)


def layer_fast_reason(module: nn.Module, scheme, shape: tuple[int, ...], groups: int
                      ) -> str | None:
    """Why ``module``'s weight converted by ``scheme`` would run dense (None: fast)."""
    if _base(module).forward not in _PLAIN:
        return f"{_base(module).__name__} has its own forward"
    if getattr(module, "transposed", False):
        return "transposed convolution"
    return scheme.fast_reason(shape, groups)


def install(module: nn.Module) -> None:
    """Give ``module`` its fast forward when it has a fast form (see the module doc)."""
    if parametrize.is_parametrized(module) and fast_reason(module) is None:
        type(module).forward = fast_forward


def is_fast(module: nn.Module) -> bool:
    """Whether ``module`` runs its fast form now."""
    return (_STATE["enabled"] and module.__dict__.get(FLAG, True)
            and type(module).__dict__.get("forward") is fast_forward
            and fast_reason(module) is None)


def set_fast(model: nn.Module, enabled: bool) -> nn.Module:
    """Turn every converted layer's fast form on or off (off: the dense forward)."""
    for module in model.modules():
        if type(module).__dict__.get("forward") is fast_forward:
            module.__dict__[FLAG] = bool(enabled)
    return model


@contextlib.contextmanager
def dense_forward() -> Iterator[None]:
    """Every layer runs its dense forward inside (to measure or compare the two)."""
    before = _STATE["enabled"]
    _STATE["enabled"] = False
    try:
        yield
    finally:
        _STATE["enabled"] = before


def fast_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every layer that runs a fast form."""
    return [(n, m) for n, m in model.named_modules() if is_fast(m)]


def _form(module: nn.Module, like: torch.Tensor) -> ChannelMaps | TapFactors:
    sym, plist = _entry(module)
    stored = plist.original
    packed = stored
    if like.is_floating_point() and packed.dtype != like.dtype:
        packed = packed.to(like.dtype)  # e.g. half-precision storage, float32 compute
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and packed.requires_grad):
        return sym.scheme.fast(packed, sym.shape, sym.groups)
    # the key of the stored tensor (every in-place update bumps its version)
    key = (stored.data_ptr(), stored._version, packed.dtype, packed.device,
           torch.is_inference_mode_enabled())
    cached = module.__dict__.get(_CACHE)
    if cached is not None and cached[0] == key:
        return cached[1]
    form = sym.scheme.fast(packed, sym.shape, sym.groups)
    module.__dict__[_CACHE] = (key, form)
    return form


def fast_forward(self: nn.Module, input: torch.Tensor) -> torch.Tensor:  # noqa: A002
    """The forward installed by ``install``."""
    if not (_STATE["enabled"] and self.__dict__.get(FLAG, True)) or fast_reason(self):
        return _base(self).forward(self, input)
    form = _form(self, input)
    if isinstance(self, nn.Linear):
        y = _linear(input, form)
        return y if self.bias is None else y + self.bias
    dims = len(self.kernel_size)
    unbatched = input.dim() == dims + 1
    x = input.unsqueeze(0) if unbatched else input
    if isinstance(form, ChannelMaps):
        y = form.post([self._conv_forward(xj, w, None) for xj, w in zip(form.pre(x), form.weights,
                                                                            strict=True)])
    else:
        y = _conv_taps(self, x, form)
    if self.bias is not None:
        y = y + self.bias.view(1, -1, *([1] * dims))
    return y.squeeze(0) if unbatched else y


def _linear(x: torch.Tensor, form: ChannelMaps | TapFactors) -> torch.Tensor:
    """Any leading dims, without a reshape (whose sizes a trace would fix): the channel
    maps see features on dim 1 through ``movedim`` views."""
    if isinstance(form, TapFactors):
        return F.linear(F.linear(x, form.down[0, 0]), form.up[0, 0])
    if x.dim() == 1:
        return _linear(x.unsqueeze(0), form).squeeze(0)
    last = x.dim() - 1  # a positive index: the ONNX exporter mistranslates movedim(-1)
    parts = [xj.movedim(1, last) for xj in form.pre(x.movedim(last, 1))]
    ys = [F.linear(xj, w).movedim(last, 1) for xj, w in zip(parts, form.weights, strict=True)]
    return form.post(ys).movedim(1, last)


def _pad(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` padded as the conv pads its input (any padding and padding mode)."""
    pads: list[int] = []
    for j, (k, d) in enumerate(zip(module.kernel_size, module.dilation, strict=True)):
        if module.padding == "valid":
            lo = hi = 0
        elif module.padding == "same":
            total = d * (k - 1)
            lo, hi = total // 2, total - total // 2
        else:
            lo = hi = module.padding[j]
        pads = [lo, hi, *pads]  # F.pad lists the last dimension first
    if not any(pads):
        return x
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, pads, mode=mode)


def _taps(module: nn.Module, sizes: tuple[int, ...]) -> list[tuple]:
    """One index per kernel tap (row-major taps): the strided, dilated slice of the padded
    input's spatial ``sizes`` that tap t reads for every output position."""
    outs = [(s - d * (k - 1) - 1) // st + 1 for s, k, d, st in
            zip(sizes, module.kernel_size, module.dilation, module.stride, strict=True)]
    indices = []
    for t in range(math.prod(module.kernel_size)):
        index, rest = [], t
        for j in reversed(range(len(sizes))):
            a, rest = rest % module.kernel_size[j], rest // module.kernel_size[j]
            start = a * module.dilation[j]
            index.insert(0, slice(start, start + module.stride[j] * (outs[j] - 1) + 1,
                                  module.stride[j]))
        indices.append((Ellipsis, *index))
    return indices


def _conv_taps(module: nn.Module, x: torch.Tensor, f: TapFactors) -> torch.Tensor:
    """y = sum_t U_t shift_t(D_t x): the down product on every input position, then the
    shifted slices (stride 1), or on the slices of the input (strided: fewer positions)."""
    g, taps, k, n = f.down.shape
    conv = _CONV[len(module.kernel_size)]
    ones = (1,) * len(module.kernel_size)
    down = f.down.reshape(g * taps * k, n, *ones)
    if all(s == 1 for s in module.stride):
        z = _pad(module, conv(x, down, groups=g)).unflatten(1, (g, taps, k))
        index = _taps(module, tuple(z.shape[4:]))
        cols = torch.stack([z[:, :, t][i] for t, i in enumerate(index)], 2)
    else:
        xp = _pad(module, x).unflatten(1, (g, n))
        xs = [xp[i] for i in _taps(module, tuple(xp.shape[3:]))]  # each (B, g, n, *out)
        cols = conv(torch.stack(xs, 2).flatten(1, 3), down, groups=g * taps)
    if cols.dim() > x.dim():  # (B, g, T, K, *out)
        cols = cols.flatten(1, 3)
    up = f.up.permute(0, 2, 1, 3).reshape(g * n, taps * k, *ones)
    return conv(cols, up, groups=g)


__all__ = ["dense_forward", "fast_forward", "fast_modules", "fast_reason", "install",
           "is_fast", "layer_fast_reason", "set_fast"]
