"""``Symmetric``: the parametrization that turns packed free parameters into the dense
weight a layer's own forward reads (``torch.nn.utils.parametrize``)."""

from __future__ import annotations

import torch
from torch import nn

from symconvert.schemes import Scheme, get_scheme


class Symmetric(nn.Module):
    """weight = scheme.unpack(original); ``original`` is the packed tensor.

    The dense weight is cached while it cannot change and no autograd graph is wanted
    (evaluation under ``no_grad``): the cache key is the packed tensor's storage and
    version counter, which every in-place update (optimiser step, ``load_state_dict``)
    bumps. Training and ``torch.compile`` always rebuild.
    """

    def __init__(self, scheme: Scheme | str, shape: tuple[int, ...], groups: int = 1) -> None:
        super().__init__()
        self.scheme = get_scheme(scheme)
        self.shape = tuple(int(s) for s in shape)
        self.groups = int(groups)
        #: set by ``attach(..., pack=False)``: the first right_inverse only shapes the tensor
        self.shape_only = False
        self._cache: tuple[tuple, torch.Tensor] | None = None

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and packed.requires_grad):
            return self.scheme.unpack(packed, self.shape, self.groups)
        # inference mode is in the key: a weight built there is an inference tensor,
        # which autograd refuses later (e.g. input gradients through a frozen model)
        key = (packed.data_ptr(), packed._version, packed.dtype, packed.device,
               torch.is_inference_mode_enabled())
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        weight = self.scheme.unpack(packed, self.shape, self.groups)
        self._cache = (key, weight)
        return weight

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        if self.shape_only:
            # the values are about to be overwritten (``load``): only the packed shape is
            # needed, so pack on the meta device (an eigh per layer is not free)
            self.shape_only = False
            meta = self.scheme.pack(weight.to("meta"), self.groups)
            return torch.zeros(meta.shape, dtype=weight.dtype, device=weight.device)
        return self.scheme.pack(weight, self.groups)

    def train(self, mode: bool = True) -> Symmetric:
        self._cache = None
        return super().train(mode)

    def _apply(self, fn, recurse=True):  # .to(), .half(): drop a cache on the old device
        self._cache = None
        return super()._apply(fn, recurse)

    def __getstate__(self):  # deepcopy / pickle never carry the cache
        state = self.__dict__.copy()
        state["_cache"] = None
        return state

    def extra_repr(self) -> str:
        groups = f", groups={self.groups}" if self.groups != 1 else ""
        return f"scheme={self.scheme.spec}, shape={self.shape}{groups}"


def symmetric_of(module: nn.Module, tensor: str = "weight") -> Symmetric | None:
    """The ``Symmetric`` parametrization on ``module.<tensor>``, if any."""
    plist = getattr(getattr(module, "parametrizations", None), tensor, None)
    if plist is None:
        return None
    for p in plist:
        if isinstance(p, Symmetric):
            return p
    return None


def converted_tensors(model: nn.Module):
    """Yield (module_name, module, tensor_name, Symmetric) for every converted tensor."""
    for name, module in model.named_modules():
        params = getattr(module, "parametrizations", None)
        if params is None:
            continue
        for tensor in list(params.keys()):
            sym = symmetric_of(module, tensor)
            if sym is not None:
                yield name, module, tensor, sym
