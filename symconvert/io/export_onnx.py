"""``--format onnx``: the folded model (dense), or with ``--packed`` the free parameters and
in-graph unpacking (``symconvert.io.export_packed``). Inputs and outputs are named and given
dynamic axes by the model's task."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from symconvert.errors import SymconvertError
from symconvert.io.export import ExportFormat, register_export
from symconvert.io.export_packed import prepare
from symconvert.tasks import task_of


@register_export
class OnnxExport(ExportFormat):
    name = "onnx"
    help = "ONNX graph (onnxruntime)"
    label = "ONNX"
    packable = True
    deployable = True

    def write(self, model: nn.Module, path: Path, *, packed: bool,
              dtype: torch.dtype) -> dict[str, Any]:
        try:
            import onnx  # noqa: F401  (the exporter needs it; an optional extra)
        except ImportError:
            raise SymconvertError(
                "ONNX export needs the onnx package: pip install 'symconvert[onnx]'.") from None
        task = task_of(model)
        info = prepare(model, packed, dtype)
        example = task.example_inputs(model)
        output_names, axes = task.dynamic_axes(model, example)
        with torch.no_grad(), native_stdout_to_stderr():
            torch.onnx.export(model, example, str(path), input_names=list(task.input_names),
                              output_names=output_names, dynamo=False, dynamic_axes=axes,
                              # folding would store the dense weights: keep the gathers
                              do_constant_folding=not packed)
        if packed:
            dedupe_initializers(path)
        return info


@contextlib.contextmanager
def native_stdout_to_stderr() -> Iterator[None]:
    """Send file descriptor 1 to stderr: the exporter prints a failed graph (139 kB for a
    transformers model) from C++ onto stdout, which is where ``report --format json``
    writes its JSON."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def dedupe_initializers(path: str | os.PathLike) -> int:
    """Keep one copy of initializers with equal bytes (shared index tables the tracer
    lifted once per layer); returns the bytes saved."""
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
    _relink(graph, rename)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    names = {i.name for i in keep}
    inputs = [i for i in graph.input if i.name not in rename or i.name in names]
    del graph.input[:]
    graph.input.extend(inputs)
    onnx.save(model, str(path))
    return saved


def _relink(graph: Any, rename: dict[str, str]) -> None:
    """Point every node input (subgraphs included) at the kept initializer."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
        for attr in node.attribute:
            if attr.g is not None and len(attr.g.node):
                _relink(attr.g, rename)
            for sub in attr.graphs:
                _relink(sub, rename)


__all__ = ["OnnxExport", "dedupe_initializers"]
