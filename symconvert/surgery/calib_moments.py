"""Calibration plumbing (``symconvert.surgery.calibrate``): running the models with hooks,
the converted tensors as fit units in forward order, each layer's (input, output) rows and the
float64 moments H = X Xᵀ, C = Y Xᵀ, ||Y||² accumulated from them. No solver here."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from symconvert.errors import SymconvertError
from symconvert.surgery.parametrization import converted_tensors


class CalibrationError(SymconvertError):
    """Calibration cannot run on this model/data (exit code 2 on the CLI).

    Defined here, the lowest of the calibration modules, so that the helpers can raise it;
    ``symconvert.surgery.calibrate`` re-exports it."""


# ----------------------------------------------------------------------------- hooks / forward


class Stop(Exception):
    """Raised by a hook once it has what it needs: the rest of the forward is skipped."""


@contextlib.contextmanager
def calibration_mode(*models: nn.Module) -> Iterator[None]:
    """Eval mode, no fused transformer fast path, and nn.MultiheadAttention calling its
    ``out_proj`` as a module (so hooks on it fire), for the duration."""
    fast = torch.backends.mha.get_fastpath_enabled()
    modes = [(m, m.training) for model in models for m in model.modules()]
    patched: list[nn.Module] = []
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        for model in models:
            model.eval()
            for m in model.modules():
                if isinstance(m, nn.MultiheadAttention) and "forward" not in vars(m):
                    m.forward = mha_forward.__get__(m)  # type: ignore[method-assign]
                    patched.append(m)
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
        for m in patched:
            del m.forward
        for m, mode in modes:
            m.training = mode


def mha_forward(self: nn.MultiheadAttention, query, key, value, key_padding_mask=None,
                 need_weights=True, attn_mask=None, average_attn_weights=True, is_causal=False):
    """nn.MultiheadAttention.forward with the output projection applied by calling the
    ``out_proj`` module (torch applies it functionally inside the attention kernel)."""
    eye = torch.eye(self.embed_dim, dtype=query.dtype, device=query.device)
    zero = torch.zeros(self.embed_dim, dtype=query.dtype, device=query.device)
    batch_first = self.batch_first
    if batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    kwargs = {}
    if not self._qkv_same_embed_dim:
        kwargs = dict(use_separate_proj_weight=True, q_proj_weight=self.q_proj_weight,
                      k_proj_weight=self.k_proj_weight, v_proj_weight=self.v_proj_weight)
    attn, weights = F.multi_head_attention_forward(
        query, key, value, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias,
        self.bias_k, self.bias_v, self.add_zero_attn, self.dropout, eye, zero,
        training=self.training, key_padding_mask=key_padding_mask, need_weights=need_weights,
        attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal,
        **kwargs)
    out = self.out_proj(attn)
    if batch_first:
        out = out.transpose(0, 1)
    return out, weights


def run_model(model: nn.Module, x: torch.Tensor, device: torch.device) -> None:
    try:
        with torch.no_grad():
            model(x.to(device))
    except Stop:
        pass


def first_tensor(out: Any) -> torch.Tensor:
    """A module's output tensor (the first item of a tuple/list output, ``last_hidden_state``
    or the first value of a dict-like one)."""
    while not isinstance(out, torch.Tensor):
        if isinstance(out, (tuple, list)):
            out = out[0]
        elif hasattr(out, "values"):
            out = next(iter(out.values()))
        else:
            raise TypeError(f"a block returned {type(out).__name__}, not a tensor")
    return out


class Feed:
    """One calibration batch through the converted then the source model (the hooks
    ``handles`` removed after): what a fit runs to see its layer's inputs and targets."""

    #: the source side must run to its end (a fit's hooks may stop the converted side only)
    source_to_end = False

    def __init__(self, model: nn.Module, source_model: nn.Module, x: torch.Tensor,
                 device: torch.device) -> None:
        self.model, self.source_model, self.x, self.device = model, source_model, x, device

    def __call__(self, handles: list) -> None:
        try:
            run_model(self.model, self.x, self.device)
            run_model(self.source_model, self.x, self.device)
        finally:
            for h in handles:
                h.remove()


class BlockFeed(Feed):
    """One calibration batch through a converted block and its source block, on their cached
    inputs (``(args, kwargs)`` each): a layer inside a block is fitted without running the
    models from their input up to it."""

    def __init__(self, block: nn.Module, source_block: nn.Module, call: tuple[tuple, dict],
                 source_call: tuple[tuple, dict], outputs: list | None = None) -> None:
        self.block, self.source_block, self.call, self.source_call = (block, source_block, call,
                                                                      source_call)
        # ``outputs``: the source block's output is appended there (the block's targets,
        # taken in the same run as the fit's instead of running the source block again)
        self.outputs = outputs

    @property
    def source_to_end(self) -> bool:  # type: ignore[override]
        return self.outputs is not None

    def __call__(self, handles: list) -> None:
        try:
            call_module(self.block, self.call)
            out = call_module(self.source_block, self.source_call)
            if self.outputs is not None and out is not None:
                self.outputs.append(first_tensor(out).detach())
        finally:
            for h in handles:
                h.remove()


#: a sampled fit keeps at least this many rows (small layers are fitted on all their rows)
MIN_SAMPLE_ROWS = 8192


F16_MAX = torch.finfo(torch.float16).max


class Half:
    """A cached float32 activation kept in float16 (half the memory); ``expand`` widens it
    back before any module sees it."""

    __slots__ = ("t",)

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t

    def __len__(self) -> int:
        return len(self.t)


def compact(value: Any) -> Any:
    """``value`` with every float32 tensor stored as a :class:`Half` (a tensor whose values do
    not fit float16 stays float32)."""
    if isinstance(value, torch.Tensor):
        if value.dtype != torch.float32:
            return value
        if value.numel() == 0:
            return Half(value.to(torch.float16))
        # one pass: a tensor with values beyond float16's range (or a NaN) stays float32
        low, high = torch.aminmax(value)
        return Half(value.to(torch.float16)) if -F16_MAX <= low and high <= F16_MAX else value
    if isinstance(value, (tuple, list)):
        return type(value)(compact(v) for v in value)
    if isinstance(value, dict):
        return {k: compact(v) for k, v in value.items()}
    return value


def expand(value: Any) -> Any:
    """The inverse of :func:`compact` (float32 tensors again; anything else as it is)."""
    if isinstance(value, Half):
        return value.t.float()
    if isinstance(value, (tuple, list)):
        return type(value)(expand(v) for v in value)
    if isinstance(value, dict):
        return {k: expand(v) for k, v in value.items()}
    return value


def call_module(module: nn.Module, call: tuple[tuple, dict]) -> Any:
    """``module(*args, **kwargs)`` without gradients (a :func:`compact` call widened first);
    None when a hook stopped it."""
    args, kwargs = expand(call)
    try:
        with torch.no_grad():
            return module(*args, **kwargs)
    except Stop:
        return None


# ----------------------------------------------------------------------------- units


@dataclass
class Unit:
    """One converted tensor (shared by its tied aliases) and the module calls that use it."""

    name: str  # the plan's layer name
    module_name: str
    tensor: str
    module: nn.Module
    sym: Any
    sites: list[str] = field(default_factory=list)  # modules whose calls use the tensor


def find_units(model: nn.Module) -> list[Unit]:
    units: dict[int, Unit] = {}
    for name, module, tensor, sym in converted_tensors(model):
        plist = module.parametrizations[tensor]
        unit = units.get(id(plist))
        if unit is None:
            label = name if tensor == "weight" else f"{name}.{tensor}"
            unit = units[id(plist)] = Unit(label, name, tensor, module, sym)
        unit.sites.append(name)
    return list(units.values())


def forward_order(model: nn.Module, units: list[Unit], x: torch.Tensor,
                  device: torch.device, also: tuple[str, ...] = ()) -> tuple[list[Unit], dict[str, int]]:
    """Units sorted by their first call in a forward pass, and the calls per pass of each
    site (and of the modules named in ``also``)."""
    order: dict[str, int] = {}
    calls: dict[str, int] = {}
    handles = []
    names = {s for u in units for s in u.sites} | set(also)
    for name, module in model.named_modules():
        if name in names:
            def hook(mod, args, _name=name):
                calls[_name] = calls.get(_name, 0) + 1
                order.setdefault(_name, len(order))
            handles.append(module.register_forward_pre_hook(hook))
    try:
        run_model(model, x[:2], device)
    finally:
        for h in handles:
            h.remove()
    never = [u.name for u in units if not any(s in order for s in u.sites)]
    if never:
        raise CalibrationError(
            f"converted layer(s) never called by the model's forward: {', '.join(never[:5])}; "
            "cannot calibrate them.")
    key = {u.name: min(order[s] for s in u.sites if s in order) for u in units}
    return sorted(units, key=lambda u: (key[u.name], _rnn_rank(u))), calls


def _rnn_rank(unit: Unit) -> tuple[int, int, int]:
    """Inside one recurrent module: layer by layer, input weights before recurrent ones
    (the recurrent fit sees the hidden states the fitted input weights produce)."""
    if not isinstance(unit.module, nn.RNNBase):
        return (0, 0, 0)
    kind, _, rest = unit.tensor.partition("_l")
    layer, _, direction = rest.partition("_")
    return (int(layer), 0 if kind == "weight_ih" else 1, 1 if direction else 0)


# ----------------------------------------------------------------------------- layer views


def is_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd)


def conv_columns(module: nn.Module, x: torch.Tensor, rows: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """im2col of a conv input: [groups, rows, in/groups * prod(kernel)] (rows = batch x
    output positions), matching ``weight.reshape(out, -1)`` of each group. ``rows``: only
    these rows (indices into batch x output positions), gathered without the whole copy."""
    nd = x.dim() - 2
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    else:
        pad = []
        for p in reversed(module.padding):
            pad += [p, p]
        if any(pad):
            x = F.pad(x, pad)
    b, c = x.shape[:2]
    for d in range(nd):
        k, s, dil = module.kernel_size[d], module.stride[d], module.dilation[d]
        span = (k - 1) * dil + 1
        x = x.unfold(2 + d, span, s)  # appends a window dim of size span
        if dil > 1:
            x = x[..., ::dil]
    # x: [b, c, o_1..o_nd, k_1..k_nd]
    g = module.groups
    out_pos = x.shape[2 : 2 + nd]
    perm = [0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)]
    x = x.permute(perm)  # a view: [b, o_1..o_nd, c, k_1..k_nd]
    if rows is not None:
        x = x[torch.unravel_index(rows, (b, *out_pos))]
    cols = x.reshape(-1, g, (c // g) * math.prod(module.kernel_size))
    return cols.transpose(0, 1)


def conv_targets(module: nn.Module, y: torch.Tensor, rows: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """Conv output [b, out, positions...] -> [groups, rows, out/groups] (``rows``: only those)."""
    b, o = y.shape[:2]
    g = module.groups
    y = y.reshape(b, o, -1).permute(0, 2, 1)
    if rows is not None:
        y = y[torch.unravel_index(rows, (b, y.shape[1]))]
    return y.reshape(-1, g, o // g).transpose(0, 1)


#: input width from which a Gram matrix is computed in bands of this many rows
GRAM_BAND = 512


def gram(x: torch.Tensor) -> torch.Tensor:
    """xᵀx of x [g, rows, d]. When d is wide, it is computed one band of ``GRAM_BAND`` rows
    of the result at a time, each band only from the diagonal on (the part below is its
    mirror): about half the products of one matmul."""
    g, _, d = x.shape
    if d < 2 * GRAM_BAND:
        return x.transpose(1, 2) @ x
    h = x.new_empty(g, d, d)
    for i in range(0, d, GRAM_BAND):
        j = i + GRAM_BAND
        band = x[:, :, i:j].transpose(1, 2) @ x[:, :, i:]       # [g, band, d - i]
        h[:, i:j, i:] = band
        h[:, j:, i:j] = band[:, :, GRAM_BAND:].transpose(1, 2)
    return h


#: input width from which moment products are taken in float32
FLOAT32_FROM = 512


class Moments:
    """Sums over rows: H = Σ x xᵀ (per group), C = Σ y xᵀ, ||y||², row count. The input gets
    a trailing constant 1 when the layer has a bias (fitted with the weight). Each chunk's
    products are taken in float32 when the input is that wide (``FLOAT32_FROM``: twice
    float64's speed where the cost is; the fits' output errors agree to 1e-5, see tests),
    else in float64, and summed in float64. (Narrow layers stay float64: a fit that
    reproduces its source exactly then reads an output error of ~1e-8, not float32's
    ~1e-3 floor.)"""

    def __init__(self, bias: bool, dtype: torch.dtype | None = None, *,
                 rows_per_dim: int | None = None, calls: int = 1, seed: int = 0) -> None:
        self.bias = bias
        self.dtype = dtype  # None: the inputs' own floating dtype (at least float32)
        self.h: torch.Tensor | None = None
        self.c: torch.Tensor | None = None
        self.yy = 0.0
        self.rows = 0
        # rows_per_dim: keep a seeded uniform sample of about rows_per_dim × d rows (at least
        # MIN_SAMPLE_ROWS) over the ``calls`` calls to ``add`` (the fraction is set from the
        # first call's row count)
        self.rows_per_dim, self.calls = rows_per_dim, calls
        self.keep: float | None = None
        self.gen = torch.Generator().manual_seed(seed)

    def pick(self, rows: int, d: int, device: torch.device) -> torch.Tensor | None:
        """The rows of one call's ``rows`` (inputs of width ``d``) to keep; None: all."""
        if self.keep is None:
            cap = max((self.rows_per_dim or 0) * (d + int(self.bias)), MIN_SAMPLE_ROWS)
            self.keep = min(1.0, cap / max(1, rows * self.calls)) if cap else 1.0
        if self.keep >= 1.0:
            return None
        idx = torch.randperm(rows, generator=self.gen)[: max(1, round(rows * self.keep))]
        return idx.to(device)

    def add_call(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        """One call of a conv/linear layer: its input ``x`` and (source) output ``y``; a conv's
        rows are sampled before its columns are copied out."""
        if not is_conv(module):
            self.add(*layer_io(module, x, y))
            return
        rows = y.numel() // y.shape[1]
        d = module.in_channels // module.groups * math.prod(module.kernel_size)
        idx = self.pick(rows, d, x.device)
        self.add(conv_columns(module, x, idx), conv_targets(module, y, idx), sampled=True)

    def add(self, x: torch.Tensor, y: torch.Tensor | None, sampled: bool = False) -> None:
        # x [g, rows, d], y [g, rows, m]; chunked so each product's copy stays small
        if not sampled:
            idx = self.pick(x.shape[1], x.shape[2], x.device)
            if idx is not None:
                x, y = x[:, idx], (None if y is None else y[:, idx])
        g, rows, d = x.shape
        dtype = self.dtype or (torch.float32 if d >= FLOAT32_FROM and x.dtype != torch.float64
                               else torch.float64)
        step = max(1, (1 << 25) // max(1, g * (d + 1)))
        for start in range(0, rows, step):
            xs = x[:, start : start + step].to(dtype)
            if self.bias:
                xs = torch.cat([xs, xs.new_ones(g, xs.shape[1], 1)], dim=2)
            h = gram(xs).double()
            self.h = h if self.h is None else self.h.add_(h)
            if y is not None:
                ys = y[:, start : start + step].to(dtype)
                c = (ys.transpose(1, 2) @ xs).double()
                self.c = c if self.c is None else self.c.add_(c)
                self.yy += float(ys.double().pow(2).sum())
        self.rows += rows


def layer_io(module: nn.Module, x: torch.Tensor, y: torch.Tensor | None):
    """(inputs [g, rows, d], targets [g, rows, m]) of a conv/linear call."""
    if is_conv(module):
        return conv_columns(module, x), (None if y is None else conv_targets(module, y))
    xs = x.reshape(1, -1, x.shape[-1])
    return xs, (None if y is None else y.reshape(1, -1, y.shape[-1]))


def packed_of(unit: Unit) -> torch.Tensor:
    return unit.module.parametrizations[unit.tensor].original


# nn.MultiheadAttention's projection tensors: which forward argument (query, key, value)
# each one reads; in_proj_weight (q/k/v stacked) reads all three, i.e. one input when the
# attention is a self-attention.
MHA_INPUTS = {"in_proj_weight": None, "q_proj_weight": 0, "k_proj_weight": 1, "v_proj_weight": 2}


def fittable(unit: Unit) -> bool:
    """Layers calibration fits: conv/linear weights, LSTM/GRU gate blocks and the input
    projections of nn.MultiheadAttention."""
    if isinstance(unit.module, nn.RNNBase):
        return True
    if isinstance(unit.module, nn.MultiheadAttention):
        return unit.tensor in MHA_INPUTS
    return isinstance(unit.module, (nn.Linear, nn.modules.conv._ConvNd)) and unit.tensor == "weight"

