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
optimisation level but ``ORT_DISABLE_ALL``), so a packed model runs at dense speed. The
exporter itself must not fold them (``do_constant_folding=False``), or the file would be
dense again.

``dtype`` (float32, bfloat16, float16) is the storage precision: tensors are stored in it
and cast to float32 in the graph, so the file shrinks and the compute stays float32.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from symconvert.errors import SymconvertError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
#: the token sequence length of a language model's example input
LM_SEQUENCE = 8


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype:
    """``float32|bfloat16|float16`` (also ``torch.float16``, ``fp16``, ``bf16``) → dtype."""
    if value is None:
        return torch.float32
    if isinstance(value, torch.dtype):
        if value in DTYPES.values():
            return value
        raise SymconvertError(f"unsupported storage dtype {value}; choose float32, bfloat16 or float16.")
    key = str(value).strip().lower().removeprefix("torch.")
    key = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}.get(key, key)
    if key not in DTYPES:
        raise SymconvertError(f"--dtype {value!r}: choose float32, bfloat16 or float16.")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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


def _is_linear_scheme(scheme) -> bool:
    return not scheme.spec.startswith("eigen")


def pack_for_export(model: nn.Module, dtype: torch.dtype = torch.float32,
                    in_graph: bool = True) -> dict[str, Any]:
    """Swap every ``Symmetric`` of ``model`` (in place) for a ``PackedWeight`` that unpacks
    by int32 gathers, the packed tensors cast to ``dtype``. Each layer's own scheme drives
    its tables (mixed per-layer schemes work); ``in_graph`` computes the transpose
    group's row table by formula instead of storing it. Returns the table accounting:
    ``{"index_bytes": int, "tables": int, "layers": int}``."""
    from symconvert.surgery.parametrization import converted_tensors

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
        if _is_linear_scheme(sym.scheme):
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
    from symconvert.surgery.layers import handler_for

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


# ------------------------------------------------------------------ model inputs


def is_language_model(model: nn.Module) -> bool:
    return bool(getattr(model, "is_language_model", False))


def example_inputs(model: nn.Module, batch_size: int = 1) -> tuple[torch.Tensor, ...]:
    """One example input: images for a vision model, ``[T, B]`` token ids for a
    language model."""
    if is_language_model(model):
        return (torch.zeros(LM_SEQUENCE, batch_size, dtype=torch.long),)
    from symconvert.io.export import example_input

    return (example_input(model, batch_size),)


def _io_names(model: nn.Module, example: tuple[torch.Tensor, ...]) -> tuple[list[str], dict]:
    if not is_language_model(model):
        return ["output"], {"input": {0: "batch"}, "output": {0: "batch"}}
    with torch.no_grad():
        _, hidden = model(*example)
    names = ["output", "hidden", "cell"] if isinstance(hidden, tuple) else ["output", "hidden"]
    axes: dict = {"input": {0: "time", 1: "batch"}, "output": {0: "time", 1: "batch"}}
    for name in names[1:]:
        axes[name] = {1: "batch"}
    return names, axes


# ---------------------------------------------------------------------- writing


def prepare(model: nn.Module, packed: bool, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Make ``model`` (in place) the module that is traced: folded to dense, or with
    in-graph unpacking; tensors stored in ``dtype``. Returns the table accounting."""
    from symconvert.surgery.convert import fold

    model.eval()
    info = {"index_bytes": 0, "tables": 0, "layers": 0}
    if packed:
        info = pack_for_export(model, dtype)
    else:
        fold(model)
    cast_storage(model, dtype)
    return info


def write_onnx(model: nn.Module, path: str | os.PathLike, packed: bool) -> None:
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise SymconvertError(
            "ONNX export needs the onnx package: pip install 'symconvert[onnx]'."
        ) from None
    example = example_inputs(model)
    output_names, axes = _io_names(model, example)
    with torch.no_grad():
        torch.onnx.export(model, example, str(path), input_names=["input"],
                          output_names=output_names, dynamo=False, dynamic_axes=axes,
                          # folding would store the dense weights: keep the gathers
                          do_constant_folding=not packed)
    if packed:
        dedupe_initializers(path)


def dedupe_initializers(path: str | os.PathLike) -> int:
    """Keep one copy of initializers with equal bytes (shared index tables the tracer
    lifted once per layer); returns the bytes saved."""
    import hashlib

    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    first: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    keep = []
    saved = 0
    for init in graph.initializer:
        raw = init.raw_data
        key = (init.data_type, tuple(init.dims), hashlib.sha256(raw).hexdigest()) if raw else None
        if key is not None and key in first:
            rename[init.name] = first[key]
            saved += len(raw)
            continue
        if key is not None:
            first[key] = init.name
        keep.append(init)
    if not rename:
        return 0

    def relink(g) -> None:
        for node in g.node:
            for i, name in enumerate(node.input):
                if name in rename:
                    node.input[i] = rename[name]
            for attr in node.attribute:
                if attr.g is not None and len(attr.g.node):
                    relink(attr.g)
                for sub in attr.graphs:
                    relink(sub)

    relink(graph)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    names = {i.name for i in keep}
    inputs = [i for i in graph.input if i.name not in rename or i.name in names]
    del graph.input[:]
    graph.input.extend(inputs)
    onnx.save(model, str(path))
    return saved


def write_torchscript(model: nn.Module, path: str | os.PathLike) -> None:
    example = example_inputs(model)
    with torch.no_grad():
        traced = torch.jit.trace(model, example, check_trace=False)
    torch.jit.save(traced, str(path))


def export_model(model: nn.Module, fmt: str, out: str | os.PathLike, *, packed: bool = False,
                 dtype: str | torch.dtype | None = None,
                 atomic_write: Callable | None = None) -> dict[str, Any]:
    """Write ``model`` (a converted model; changed in place) as ``onnx`` or
    ``torchscript``; ``packed`` keeps the free parameters and unpacks in the graph.
    Returns ``{"path", "bytes", "index_bytes", "tables", "layers"}``."""
    from symconvert.io.checkpoint import _atomic_write

    if fmt not in ("onnx", "torchscript"):
        raise SymconvertError(f"--packed needs --format onnx or torchscript, not {fmt!r}.")
    out = Path(out)
    info = prepare(model, packed, parse_dtype(dtype))
    write = (lambda p: write_onnx(model, p, packed)) if fmt == "onnx" \
        else (lambda p: write_torchscript(model, p))
    (atomic_write or _atomic_write)(out, write)
    return {"path": out, "bytes": out.stat().st_size, **info}


# -------------------------------------------------------------------- estimates


def deployment_bytes(model: nn.Module) -> dict[str, Any]:
    """Tensor bytes each export would store, per storage dtype, without writing a file:
    ``{"dense_onnx", "packed_onnx", "dense_torchscript", "packed_torchscript",
    "index_bytes", "by_dtype": {dtype: {"symconvert", "dense", "packed_onnx",
    "packed_torchscript"}}}`` (float32 at the top level). A file adds its graph and header
    (well under 1 % for real models); a dense ONNX export is smaller by the BatchNorms the
    exporter folds into the convolutions."""
    from symconvert.surgery.parametrization import converted_tensors

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
        if _is_linear_scheme(sym.scheme):
            key = (sym.scheme.spec, sym.shape, sym.groups, tuple(orig.shape))
            if key not in tables:
                _, rows, cols = gather_tables(sym.scheme, tuple(orig.shape), sym.shape, sym.groups)
                if _triangle_layout(rows, sym.shape) is not None:
                    rows = None  # computed in-graph
                tables[key] = sum(t.numel() * 4 for t in (rows, cols) if t is not None)
    index = sum(tables.values())
    by_dtype = {}
    for name, dt in DTYPES.items():
        size = torch.empty((), dtype=dt).element_size()
        dense = (plain_params + dense_params) * size + buffers
        packed = (plain_params + packed_params) * size + buffers + index
        by_dtype[name] = {"symconvert": packed - index, "dense": dense,
                          "packed_onnx": packed, "packed_torchscript": packed}
    return {"dense_onnx": by_dtype["float32"]["dense"],
            "packed_onnx": by_dtype["float32"]["packed_onnx"],
            "dense_torchscript": by_dtype["float32"]["dense"],
            "packed_torchscript": by_dtype["float32"]["packed_torchscript"],
            "index_bytes": index, "by_dtype": by_dtype}


def store_directory_as(directory: str | os.PathLike, dtype: str | torch.dtype | None) -> None:
    """Rewrite a model directory with its tensors in ``dtype`` (``finetune --dtype``: the
    run trains and checkpoints in float32; only the written model is stored smaller)."""
    import symconvert

    storage = parse_dtype(dtype)
    if storage == torch.float32 and symconvert.read_metadata(directory).get("dtype") in (None, "float32", "torch.float32"):
        return
    model = symconvert.load(directory)
    symconvert.save(model, directory, dtype=storage, overwrite=True)


def measure_deployment(directory: str | os.PathLike) -> dict[str, Any]:
    """The report's ``deployment`` entry for a model directory: bytes of every export
    format, written to a temporary directory and measured (float32), plus the tensor
    bytes per storage dtype (``by_dtype``, computed: dtype size × tensors, + index tables
    for packed). A format that cannot be written is absent, with its reason in
    ``reasons``."""
    import tempfile

    import symconvert
    from symconvert.io.export import export

    directory = Path(directory)
    model = symconvert.load(directory)
    computed = deployment_bytes(model)
    out: dict[str, Any] = {"symconvert": (directory / "model.safetensors").stat().st_size}
    reasons: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="symconvert-deploy-") as tmp:
        for fmt in ("onnx", "torchscript"):
            for packed in (False, True):
                key = f"{'packed' if packed else 'dense'}_{fmt}"
                try:
                    path = export(symconvert.load(directory), fmt, Path(tmp) / key, packed=packed)
                    out[key] = path.stat().st_size
                except Exception as exc:  # noqa: BLE001  (a measurement: report why it is missing)
                    reasons[key] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    try:
        dtype = dtype_name(parse_dtype(symconvert.read_metadata(directory).get("dtype")))
    except SymconvertError:
        dtype = "float32"
    out.update({"index_bytes": computed["index_bytes"], "stored_dtype": dtype,
                "by_dtype": computed["by_dtype"]})
    if reasons:
        out["reasons"] = reasons
    return out
