"""Deployable exports: ONNX and TorchScript, dense or packed, in a storage precision.

``--packed`` keeps the free parameters in the file and rebuilds each dense weight inside
the graph. Every permutation scheme (channel, quarter, eighth, flip, spatial,
channel+spatial, block, repeat:R; grouped convs and RNN gate blocks included) unpacks by
selection: each dense entry equals one packed entry. The exporter finds that selection
from the layer's own recorded scheme, by unpacking ``arange(packed.numel())``, and
factors it as

    W.reshape(O*I, T)[p, t] = P.reshape(-1, C)[rows[p], cols[t]]

(``p`` an (out, in) position, ``t`` a tap), so the graph is ``Gather(rows)``, then
``Gather(cols)`` on the taps axis, then ``Reshape``; either gather is dropped when it is
the identity (``channel`` needs no ``cols``; ``spatial`` no ``rows``). The tables are
int32, one per (scheme, shape, groups), shared by every layer of that shape: their cost is
4 bytes per (out, in) position of each distinct shape (``index_bytes``), not per weight
element. ``eigen:K`` has no table: its ``V diag(e) Vᵀ`` is traced as is. A selection that
does not factor (none of the shipped schemes) falls back to one int32 entry per element.

onnxruntime folds these constant sub-graphs when it creates the session (any graph
optimisation level but ``ORT_DISABLE_ALL``), so a packed model runs at dense speed. A
layer with a fast form (``symconvert.surgery.fast``: flip, eighth, quarter, repeat:R,
eigen:K) reads the packed tensor itself, so its graph holds the small weights and the
channel maps and runs fewer multiply-adds than the dense one. The
exporter itself must not fold them (``do_constant_folding=False``), or the file would be
dense again.

``dtype`` (float32, bfloat16, float16) is the storage precision: tensors are stored in it
and cast to float32 in the graph, so the file shrinks and the compute stays float32.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from symconvert.io.dtypes import DTYPES
from symconvert.io.export import EXPORTS
from symconvert.surgery.convert import fold
from symconvert.surgery.layers import handler_for
from symconvert.surgery.parametrization import converted_tensors

# ----------------------------------------------------------------- index tables


def gather_tables(scheme, packed_shape: tuple[int, ...], shape: tuple[int, ...], groups: int
                  ) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
    """``(C, rows, cols)`` with ``W.reshape(O*I, T) = P.reshape(-1, C)[rows][:, cols]``;
    ``None`` for an identity gather. int32 tables."""
    count = math.prod(packed_shape)
    with torch.no_grad():
        element = scheme.unpack(torch.arange(count, dtype=torch.int64).reshape(packed_shape),
                                tuple(shape), groups)
    positions = shape[0] * shape[1]
    taps = math.prod(shape[2:])
    flat = element.reshape(positions, taps)
    width = math.prod(packed_shape[2:]) if len(packed_shape) > 2 else 1
    rows = flat[:, 0] // width
    cols = flat[0] - (flat[0, 0] // width) * width
    if not torch.equal(flat, rows[:, None] * width + cols[None, :]) or int(cols.max()) >= width:
        # no (position, tap) factorisation: one entry per element
        return 1, element.reshape(-1).to(torch.int32), None
    rows_out = None if (count // width == positions and torch.equal(rows, torch.arange(positions))) \
        else rows.to(torch.int32)
    cols_out = None if (width == taps and torch.equal(cols, torch.arange(taps))) else cols.to(torch.int32)
    return width, rows_out, cols_out


def triangle_rows(out: int, inp: int, n: int, along_out: bool,
                  zero: torch.Tensor | int = 0) -> torch.Tensor:
    """The ``rows`` table of the transpose group (``channel``, ``block``, RNN gate blocks)
    by formula: (out, in) position -> block * n(n+1)/2 + its upper-triangle index. In a
    traced graph it is a few integer ops on two ``arange`` s, which onnxruntime folds.
    ``zero`` (an int64 0 computed from a weight) keeps the exporter's own constant
    propagation from folding the table into a stored int64 constant."""
    if isinstance(zero, torch.Tensor):  # traced: Range ops, not stored aranges
        o = torch.arange(zero.reshape(()), (zero + out).reshape(())).unsqueeze(1)
        i = torch.arange(zero.reshape(()), (zero + inp).reshape(())).unsqueeze(0)
    else:
        o = torch.arange(out).unsqueeze(1)
        i = torch.arange(inp).unsqueeze(0)
    if along_out:
        block, a, c = o // n, o % n, i
    else:  # [S_1 ... S_r] side by side
        block, a, c = i // n, o, i % n
    lo, hi = torch.minimum(a, c), torch.maximum(a, c)
    return (block * (n * (n + 1) // 2) + lo * n - lo * (lo - 1) // 2 + hi - lo).reshape(-1)


def _triangle_layout(rows: torch.Tensor | None, shape: tuple[int, ...]) -> tuple[int, bool] | None:
    """(n, along_out) when ``rows`` is the transpose group's table (then it need not be
    stored), else None."""
    if rows is None:
        return None
    out, inp = shape[0], shape[1]
    for n, along_out in ((inp, True), (out, False)):
        if n >= 2 and (out if along_out else inp) % n == 0 and rows.numel() == out * inp \
                and torch.equal(rows.long(), triangle_rows(out, inp, n, along_out)):
            return n, along_out
    return None


class PackedWeight(nn.Module):
    """The dense weight from the packed tensor, by traceable gathers (see the module doc).

    Replaces ``Symmetric`` in a layer's ParametrizationList for export only: the tables
    are buffers (shared tensors across layers of one shape), the packed tensor is cast to
    ``compute`` first."""

    def __init__(self, sym, width: int, rows: torch.Tensor | None, cols: torch.Tensor | None,
                 compute: torch.dtype = torch.float32,
                 triangle: tuple[int, bool] | None = None) -> None:
        super().__init__()
        self.scheme, self.shape, self.groups = sym.scheme, sym.shape, sym.groups
        self.width = width
        self.triangle = triangle  # rows computed in-graph, not stored
        if triangle is not None:
            rows = None
        self.compute = compute
        self.direct = width == 0  # eigen: the scheme's own (traceable) unpack
        self.register_buffer("rows", rows)
        self.register_buffer("cols", cols)

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        packed = packed.to(self.compute)
        if self.direct:
            return self.scheme.unpack(packed, self.shape, self.groups)
        x = packed.reshape(-1, self.width)
        if self.triangle is not None:
            zero = packed.reshape(-1)[:0].sum().to(torch.int64)  # exactly 0, never NaN
            x = x.index_select(0, triangle_rows(self.shape[0], self.shape[1], *self.triangle,
                                                zero=zero))
        elif self.rows is not None:
            x = x.index_select(0, self.rows)
        if self.cols is not None:
            x = x.index_select(1, self.cols)
        return x.reshape(self.shape)


class _Cast(nn.Module):
    """weight = stored.to(compute): a tensor stored in half precision, used in float32."""

    def __init__(self, compute: torch.dtype) -> None:
        super().__init__()
        self.compute = compute

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.to(self.compute)


def pack_for_export(model: nn.Module, dtype: torch.dtype = torch.float32,
                    in_graph: bool = True) -> dict[str, Any]:
    """Swap every ``Symmetric`` of ``model`` (in place) for a ``PackedWeight`` that unpacks
    by int32 gathers, the packed tensors cast to ``dtype``. Each layer's own scheme drives
    its tables (mixed per-layer schemes work); ``in_graph`` computes the transpose
    group's row table by formula instead of storing it. Returns the table accounting:
    ``{"index_bytes": int, "tables": int, "layers": int}``."""
    tables: dict[tuple, tuple] = {}
    done: set[int] = set()
    layers = 0
    for _, module, tensor, sym in list(converted_tensors(model)):
        plist = module.parametrizations[tensor]
        if id(plist) in done:  # a tied alias shares the list
            continue
        done.add(id(plist))
        layers += 1
        packed_shape = tuple(plist.original.shape)
        if sym.scheme.is_gather:
            key = (sym.scheme.spec, sym.shape, sym.groups, packed_shape)
            if key not in tables:
                width, rows, cols = gather_tables(sym.scheme, packed_shape, sym.shape, sym.groups)
                triangle = _triangle_layout(rows, sym.shape) if in_graph else None
                tables[key] = (width, None if triangle else rows, cols, triangle)
            width, rows, cols, triangle = tables[key]
        else:
            width, rows, cols, triangle = 0, None, None, None
        with torch.no_grad():
            plist.original.data = plist.original.data.to(dtype)
        for i, p in enumerate(plist):
            if p is sym:
                plist[i] = PackedWeight(sym, width, rows, cols, triangle=triangle)
    index_bytes = sum(t.numel() * t.element_size() for _, r, c, _ in tables.values()
                      for t in (r, c) if t is not None)
    return {"index_bytes": index_bytes, "tables": len(tables), "layers": layers}


def cast_storage(model: nn.Module, dtype: torch.dtype) -> None:
    """Store every plain floating parameter of ``model`` in ``dtype`` and read it back as
    float32 through a cast (buffers such as BatchNorm statistics stay float32)."""
    if dtype == torch.float32:
        return
    seen: set[int] = set()
    for module in list(model.modules()):
        touched = False
        for name, param in list(module.named_parameters(recurse=False)):
            if not param.is_floating_point():
                continue
            if id(param) not in seen:
                seen.add(id(param))
                param.data = param.data.to(dtype)
            parametrize.register_parametrization(module, name, _Cast(torch.float32), unsafe=True)
            touched = True
        if touched and isinstance(module, nn.RNNBase):
            # nn.RNNBase reads a cached flat list of weights: make it read the casts
            handler = handler_for(module)
            if handler is not None:
                handler.after_convert(module)


# ---------------------------------------------------------------------- writing


def prepare(model: nn.Module, packed: bool, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Make ``model`` (in place) the module that is traced: folded to dense, or with
    in-graph unpacking; tensors stored in ``dtype``. Returns the table accounting."""
    model.eval()
    info = {"index_bytes": 0, "tables": 0, "layers": 0}
    if packed:
        info = pack_for_export(model, dtype)
    else:
        fold(model)
    cast_storage(model, dtype)
    return info


# -------------------------------------------------------------------- estimates


def deployment_bytes(model: nn.Module) -> dict[str, Any]:
    """Tensor bytes each deployable export format F (``ExportFormat.deployable``: onnx,
    torchscript) would store, per storage dtype, without writing a file: ``{"dense_F",
    "packed_F", "index_bytes", "by_dtype": {dtype: {"symconvert", "dense", "packed_F"}}}``
    (float32 at the top level). A file adds its graph and header
    (well under 1 % for real models); a dense ONNX export is smaller by the BatchNorms the
    exporter folds into the convolutions."""
    converted: dict[int, tuple] = {}
    for _, module, tensor, sym in converted_tensors(model):
        plist = module.parametrizations[tensor]
        converted.setdefault(id(plist), (sym, plist.original))
    packed_ids = {id(orig) for _, orig in converted.values()}
    plain_params = 0
    seen: set[int] = set()
    for param in model.parameters():
        if id(param) in seen or id(param) in packed_ids:
            continue
        seen.add(id(param))
        plain_params += param.numel()
    buffers = sum(b.numel() * b.element_size() for name, b in model.named_buffers()
                  if not name.endswith("num_batches_tracked"))
    packed_params = sum(orig.numel() for _, orig in converted.values())
    dense_params = sum(math.prod(sym.shape) for sym, _ in converted.values())
    tables: dict[tuple, int] = {}
    for sym, orig in converted.values():
        if sym.scheme.is_gather:
            key = (sym.scheme.spec, sym.shape, sym.groups, tuple(orig.shape))
            if key not in tables:
                _, rows, cols = gather_tables(sym.scheme, tuple(orig.shape), sym.shape, sym.groups)
                if _triangle_layout(rows, sym.shape) is not None:
                    rows = None  # computed in-graph
                tables[key] = sum(t.numel() * 4 for t in (rows, cols) if t is not None)
    index = sum(tables.values())
    formats = [name for name, fmt in EXPORTS.items() if fmt.deployable]
    by_dtype = {}
    for name, dt in DTYPES.items():
        size = torch.empty((), dtype=dt).element_size()
        dense = (plain_params + dense_params) * size + buffers
        packed = (plain_params + packed_params) * size + buffers + index
        by_dtype[name] = {"symconvert": packed - index, "dense": dense,
                          **{f"packed_{fmt}": packed for fmt in formats}}
    top = by_dtype["float32"]
    return {**{f"{kind}_{fmt}": top["dense" if kind == "dense" else f"packed_{fmt}"]
               for fmt in formats for kind in ("dense", "packed")},
            "index_bytes": index, "by_dtype": by_dtype}


__all__ = ["PackedWeight", "cast_storage", "deployment_bytes", "gather_tables",
           "pack_for_export", "prepare", "triangle_rows"]
