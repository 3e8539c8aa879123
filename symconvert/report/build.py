"""The parameter/accuracy report (SPEC §7): the computation. One measurement, three
renderings (``symconvert.report.render``), a plot (``symconvert.report.plot``) and the baselines
(``symconvert.report.compare``).

``build_report(DIR, options=ReportOptions(...))`` measures everything once and returns a
JSON-able dict whose top-level keys are the contract of SPEC §7.1 (``model``, ``scheme``,
``params``, ``bytes``, ``accuracy``, ``layers``) plus ``task``, ``flops``, ``latency``,
``deployment``, ``curves``, ``compare`` and ``provenance``. ``sections(report)`` (in
``render``) turns that dict into titled tables of strings, which ``render_table`` (rich) and
``render_markdown`` print; ``render_json`` dumps the dict. So the three formats cannot
disagree: they format the same numbers with the same functions.

The model's task (the one its directory records) decides what is measured: its scores
(top-1/top-5, perplexity), its example input for FLOPs and latency. Accuracy entries that
could not be measured are absent and carry a ``"reason"`` instead, never a zero.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy
import torch

from symconvert.checks import resolve_device
from symconvert.io.checkpoint import versions
from symconvert.io.loading import load, read_metadata
from symconvert.models.sources import model_string
from symconvert.report.accuracy import accuracy
from symconvert.report.compare import compare
from symconvert.report.deployment import measure_deployment
from symconvert.report.layers import layer_table
from symconvert.report.measure import bytes_on_disk, fast_latency, flops, latency, read_metrics
from symconvert.report.options import ReportOptions
from symconvert.report.render import Report
from symconvert.report.sources import SourceCache
from symconvert.surgery.plan import count_parameters
from symconvert.tasks import check_data, task_of
from symconvert.tasks.data import parse_data_spec
from symconvert.train.state import METRICS_NAME

REPORT_VERSION = 1

Log = Callable[[str], None]


def build_report(directory: str | os.PathLike, data: str | None = None, *,
                 options: ReportOptions | None = None, log: Log | None = None,
                 **kwargs: Any) -> Report:
    """Measure the model directory ``directory`` (converted or fine-tuned) once.

    ``options`` (a ``ReportOptions``) says how; ``data`` (a ``--data`` spec, enabling the
    accuracy and the baselines) and keyword arguments (its fields) build or override it.
    ``log`` receives one line per stage (the CLI prints them on stderr).
    """
    if options is None:
        options = ReportOptions(data=data, **kwargs)
    elif data is not None or kwargs:
        options = dataclasses.replace(options, **({"data": data} if data else {}), **kwargs)
    say = log or (lambda _msg: None)
    directory = Path(directory)
    meta = read_metadata(directory)
    device = resolve_device(options.device)
    if options.data:
        parse_data_spec(options.data)  # a bad spec fails now, before any measuring
    say(f"loading {directory}")
    model = load(directory).eval()
    if options.data:
        check_data(model, options.data)  # of the model's task: before any measuring
    task = task_of(model)
    parent = _parent(directory, meta)
    kind = "finetuned" if parent is not None or meta.get("finetune") else "converted"
    sources = SourceCache(dict(meta["source"]))
    report = _summary(directory, meta, model, kind, sources)
    report["task"] = task.name
    say("writing the dense export to measure its size")
    report["bytes"] = bytes_on_disk(directory)
    say("writing every deployable export format (dense and packed) to measure it")
    report["deployment"] = measure_deployment(directory)
    report["layers"], report["layers_from"] = layer_table(directory, meta, parent, sources)
    say("counting FLOPs")
    report["flops"] = flops(directory, sources, options)
    say(f"timing the folded model and the source ({options.latency_runs} runs each)")
    report["latency"] = latency(directory, sources, options, device)
    say("timing the fast forms against the dense forward (batch 1 and 8)")
    report["fast_latency"] = fast_latency(directory, options, device)
    report["accuracy"] = accuracy(model, task, directory, meta, parent, kind, sources,
                                  options, device, say)
    report["curves"] = {"finetuned": read_metrics(directory / METRICS_NAME)}
    if options.compare:
        report["compare"] = compare(report, task, meta, sources, options, device, say)
    report["provenance"] = _provenance(directory, meta, parent, options, device, report)
    return report


def _summary(directory: Path, meta: dict[str, Any], model: Any, kind: str,
             sources: SourceCache) -> Report:
    """The report's head: model, scheme, kind and parameters before/after."""
    after = count_parameters(model)
    before = count_parameters(sources.architecture())
    return {
        "report_version": REPORT_VERSION,
        "model": model_string(meta["source"]),
        "scheme": _scheme_of(meta),
        "directory": str(directory.resolve()),
        "kind": kind,
        "params": {"before": before, "after": after, "saved": before - after,
                   "saved_fraction": (before - after) / before if before else 0.0},
    }


def _scheme_of(meta: dict[str, Any]) -> str:
    recorded = (meta.get("convert") or {}).get("scheme")
    schemes = sorted({r.get("scheme") for r in (meta.get("layers") or {}).values()})
    if recorded == "auto":  # --scheme auto: each layer's own scheme is in the layer table
        return "auto"
    if recorded and (not schemes or schemes == [recorded]):
        return str(recorded)
    return ",".join(schemes) if schemes else "none"


def _parent(directory: Path, meta: dict[str, Any]) -> Path | None:
    parent = meta.get("parent")
    if not parent:
        return None
    path = Path(parent)
    if not path.is_absolute():  # recorded relative to where finetune ran: try both anchors
        for anchor in (Path.cwd(), directory.resolve().parent):
            if (anchor / path).is_dir():
                return anchor / path
    return path


def _provenance(directory: Path, meta: dict[str, Any], parent: Path | None,
                options: ReportOptions, device: torch.device, report: Report) -> dict[str, Any]:
    acc = report.get("accuracy", {})
    device_name = str(device)
    if device.type == "cuda":
        device_name += f" ({torch.cuda.get_device_name(device)})"
    else:
        device_name += f" ({platform.processor() or platform.machine()}, " \
                       f"torch threads: {torch.get_num_threads()})"
    return {
        "data": options.data,
        "split": acc.get("split"),
        "n": acc.get("n"),
        "subsample": options.subsample,
        "device": device_name,
        "versions": {**versions(), "python": platform.python_version(),
                     "numpy": numpy.__version__},
        "recorded_versions": meta.get("versions"),
        "convert": meta.get("convert"),
        "finetune": (meta.get("finetune") or {}).get("args"),
        "parent": str(parent) if parent is not None else None,
        "sha256": meta.get("sha256"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


__all__ = ["REPORT_VERSION", "ReportOptions", "build_report"]
