"""The report's measurements of a model directory against its source: FLOPs and latency of
the folded model (on the example input the model's task gives), bytes on disk, and the
fine-tuning curve (``metrics.jsonl``)."""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from symconvert.errors import SymconvertError
from symconvert.io.export import export_with_info
from symconvert.io.files import WEIGHTS_NAME
from symconvert.io.loading import load
from symconvert.report.options import ReportOptions
from symconvert.report.sources import SourceCache
from symconvert.surgery.convert import fold
from symconvert.surgery.fast import dense_forward, fast_modules
from symconvert.surgery.parametrization import converted_tensors
from symconvert.tasks import task_of


def example(model: nn.Module, options: ReportOptions, batch: int) -> torch.Tensor:
    """What the model's task feeds it (``Task.example_inputs``), ``--input-size`` applied."""
    return task_of(model).example_inputs(model, batch, options.input_size)[0]


def count_flops(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward (``torch.utils.flop_counter``: matmuls and convolutions)."""
    return layer_flops(model, example)[""]


def layer_flops(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """FLOPs of one forward of what actually runs, per module name ("" the whole model)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(example)
    root = type(model).__name__
    out = {"": int(counter.get_total_flops())}
    for key, ops in counter.get_flop_counts().items():
        if key.startswith(root + "."):
            out[key[len(root) + 1:]] = int(sum(ops.values()))
    return out


def _does_not_run(x: torch.Tensor, exc: Exception) -> str:
    return (f"the model does not run on an example input of shape {list(x.shape)} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); pass --input-size")


def flops(directory: Path, sources: SourceCache, options: ReportOptions) -> dict[str, Any]:
    converted = load(directory).eval()
    folded = fold(load(directory)).eval()
    x = example(folded, options, 1)
    try:
        source = layer_flops(sources.architecture(), x)
        after = count_flops(folded, x)
        fast = layer_flops(converted, x)
    except (RuntimeError, TypeError, ValueError) as exc:
        return {"reason": _does_not_run(x, exc)}
    names = [n for n, _ in fast_modules(converted)]
    return {"source": source[""], "folded": after, "input": list(x.shape),
            "note": "the folded model runs the dense layers (FLOPs as the source); the "
                    "converted model runs each fast form (flip, eighth, quarter, repeat:R, "
                    "eigen:K) with fewer multiply-adds",
            "fast": fast[""], "fast_vs_source": fast[""] / source[""] if source[""] else None,
            "fast_layers": len(names),
            "per_layer": {n: [source.get(n), fast.get(n)] for n in source if n and n in fast
                          and source[n] and n in _converted_names(converted)}}


def _converted_names(model: nn.Module) -> set[str]:
    return {name for name, _, _, _ in converted_tensors(model)}


def median_latency(models: dict[str, nn.Module], example: torch.Tensor, runs: int,
                   device: torch.device, warmup: int = 2) -> dict[str, float]:
    """Median forward time in ms per model, runs interleaved (A, B, A, B, ...) so that
    load from other processes hits every model alike."""
    timings: dict[str, list[float]] = {k: [] for k in models}
    x = example.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        for m in models.values():
            m.to(device).eval()
            for _ in range(warmup):
                m(x)
        for _ in range(runs):
            for name, m in models.items():
                sync()
                t0 = time.perf_counter()
                m(x)
                sync()
                timings[name].append((time.perf_counter() - t0) * 1000.0)
    return {k: statistics.median(v) for k, v in timings.items()}


def latency(directory: Path, sources: SourceCache, options: ReportOptions,
            device: torch.device) -> dict[str, Any]:
    converted = load(directory).eval()
    folded = fold(load(directory)).eval()
    source = sources.architecture()
    if sources.has_weights:
        # Trained weights on both sides: value-dependent CPU paths (denormals) hit alike.
        try:
            source = sources.weighted()
        except SymconvertError:  # offline without cached weights: the architecture times the same
            pass
    x = example(folded, options, options.latency_batch)
    if x.is_floating_point():
        x = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    try:
        ms = median_latency({"source": source, "folded": folded, "converted": converted},
                            x, options.latency_runs, device)
    except (RuntimeError, TypeError, ValueError) as exc:
        return {"reason": _does_not_run(x, exc), "batch": options.latency_batch,
                "device": str(device)}
    finally:
        source.to("cpu")
    return {
        "source_ms": ms["source"], "folded_ms": ms["folded"], "converted_ms": ms["converted"],
        "folded_vs_source": ms["folded"] / ms["source"] if ms["source"] else None,
        "batch": options.latency_batch, "runs": options.latency_runs, "device": str(device),
        "input": list(x.shape),
        "converted_vs_folded": ms["converted"] / ms["folded"] if ms["folded"] else None,
    }


def paired_ratio(fa, fb, runs: int, sync=lambda: None) -> dict[str, float]:
    """Median times of A and B (ms) and the median of the per-pair ratios B/A; pairs
    interleaved, alternating which side runs first, so that load hits both alike."""
    a, b = [], []
    for i in range(runs):
        for f, out in ((fb, b), (fa, a)) if i % 2 else ((fa, a), (fb, b)):
            sync()
            t0 = time.perf_counter()
            f()
            sync()
            out.append((time.perf_counter() - t0) * 1000.0)
    return {"dense_ms": statistics.median(a), "fast_ms": statistics.median(b),
            "fast_vs_dense": statistics.median(y / x for x, y in zip(a, b, strict=True))}


def fast_latency(directory: Path, options: ReportOptions, device: torch.device,
                 batches: tuple[int, ...] = (1, 8)) -> dict[str, Any]:
    """The converted model's fast forms against its dense forward (same weights), eager,
    per batch size: interleaved pairs, median of the ratios."""
    model = load(directory).eval().to(device)
    layers = len(fast_modules(model))
    if not layers:
        return {"reason": "no converted layer has a fast form (see `inspect`: FLOPs column)"}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out: dict[str, Any] = {"layers": layers, "runs": options.latency_runs, "device": str(device)}
    for batch in batches:
        x = example(model, options, batch).to(device)
        if x.is_floating_point():
            x = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(device)

        def dense(x=x):
            with dense_forward():
                model(x)

        try:
            with torch.no_grad():
                dense(), model(x)  # warm-up (and the dense weight cache)
                out[f"batch_{batch}"] = paired_ratio(dense, lambda x=x: model(x),
                                                     options.latency_runs, sync)
        except (RuntimeError, TypeError, ValueError) as exc:
            return {"reason": _does_not_run(x, exc)}
    return out


def dense_bytes(model: nn.Module) -> int:
    """Bytes of ``model`` exported dense (folded safetensors; ``model`` is folded)."""
    with tempfile.TemporaryDirectory(prefix="symconvert-report-") as tmp:
        # (a transformers model's dense export is a directory: its weights file's bytes)
        return export_with_info(model, "dense", Path(tmp) / "dense.safetensors")["bytes"]


def bytes_on_disk(directory: Path) -> dict[str, Any]:
    """The directory's tensors file against the dense export of the same model."""
    ours = (directory / WEIGHTS_NAME).stat().st_size
    dense = dense_bytes(load(directory))
    return {"symconvert": ours, "dense": dense,
            "saved_fraction": (dense - ours) / dense if dense else 0.0}


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (one JSON object per line); blank or broken lines
    and non-object rows are skipped, missing keys are the plot's problem."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


__all__ = ["bytes_on_disk", "count_flops", "fast_latency", "layer_flops", "dense_bytes", "example", "flops", "latency",
           "median_latency", "read_metrics"]
