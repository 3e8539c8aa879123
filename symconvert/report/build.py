"""The parameter/accuracy report (SPEC §7): the computation. One measurement, three
renderings (``symconvert.report.render``), a plot (``symconvert.report.plot``) and the baselines.

``build_report(DIR, data)`` measures everything once and returns a JSON-able dict whose
top-level keys are the contract of SPEC §7.1 (``model``, ``scheme``, ``params``, ``bytes``,
``accuracy``, ``layers``) plus ``flops``, ``latency``, ``curves``, ``compare`` and
``provenance``. ``sections(report)`` (in ``render``) turns that dict into titled tables of
strings, which ``render_table`` (rich) and ``render_markdown`` print; ``render_json`` dumps the
dict. So the three formats cannot disagree: they format the same numbers with the same functions.

Accuracy entries that could not be measured are absent and carry a ``"reason"`` instead,
never a zero. ``--compare prune`` prunes the source (global L1, same number of removed
parameters) and ``--compare dense`` keeps it dense; both are fine-tuned with the recorded
fine-tuning configuration through ``symconvert.train.loop.fit`` (the loop ``finetune`` runs) and
evaluated on the same split.

The rendering and plotting names are re-exported here so that older imports keep working.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from symconvert.errors import SymconvertError
from symconvert.report.measure import (
    _accuracy,
    _compare,
    _flops,
    _latency,
    count_flops,
    median_latency,
    read_metrics,
)
from symconvert.report.plot import plot_report
from symconvert.report.render import (
    COMPARE_KINDS,
    FORMATS,
    Report,
    Section,
    compare_sentence,
    render,
    render_json,
    render_markdown,
    render_table,
    render_text,
    sections,
)

REPORT_VERSION = 1
PLAN_NAME = "plan.json"
METRICS_NAME = "metrics.jsonl"

Log = Callable[[str], None]


# ------------------------------------------------------------------------ options


@dataclass
class ReportOptions:
    """How to measure. Every field is a CLI flag of ``symconvert report``."""

    data: str | None = None
    device: str = "auto"
    batch_size: int = 256  # evaluation batch
    subsample: int | None = None  # evaluate on a fixed stratified subset of the eval split
    input_size: str | None = None
    workers: int = 0
    latency_runs: int = 10
    latency_batch: int = 8
    compare: tuple[str, ...] = ()
    progress: bool = False  # rich progress bars while fine-tuning baselines

    def __post_init__(self) -> None:
        self.compare = tuple(parse_compare(self.compare))
        if self.batch_size < 1:
            raise SymconvertError(f"--batch-size {self.batch_size}: need at least 1")
        if self.latency_runs < 1:
            raise SymconvertError(f"--latency-runs {self.latency_runs}: need at least 1")
        if self.latency_batch < 1:
            raise SymconvertError(f"--latency-batch {self.latency_batch}: need at least 1")
        if self.subsample is not None and self.subsample < 1:
            raise SymconvertError(f"--subsample {self.subsample}: need at least 1")
        if self.compare and not self.data:
            raise SymconvertError(
                f"--compare {','.join(self.compare)} needs --data SPEC: the baselines are "
                "judged by their accuracy on the eval split (e.g. --data digits)."
            )


def parse_compare(value: str | Sequence[str] | None) -> list[str]:
    """``"prune,dense"`` → ``["prune", "dense"]`` (order kept, duplicates dropped)."""
    if not value:
        return []
    items = value.split(",") if isinstance(value, str) else [
        part for v in value for part in str(v).split(",")]
    out: list[str] = []
    for item in (i.strip().lower() for i in items):
        if not item:
            continue
        if item not in COMPARE_KINDS:
            raise SymconvertError(
                f"--compare {item!r}: choose from {', '.join(COMPARE_KINDS)} "
                "(e.g. --compare prune,dense)."
            )
        if item not in out:
            out.append(item)
    return out


# -------------------------------------------------------------------- computation


def build_report(directory: str | os.PathLike, data: str | None = None, *,
                 options: ReportOptions | None = None, log: Log | None = None,
                 **kwargs: Any) -> Report:
    """Measure the model directory ``directory`` (converted or fine-tuned) once.

    ``data`` (a ``--data`` spec) enables the accuracy and the baselines; ``options`` or
    keyword arguments take the fields of ``ReportOptions``. ``log`` receives one line per
    stage (the CLI prints them on stderr).
    """
    import symconvert
    from symconvert.io.checkpoint import read_metadata
    from symconvert.train.evaluate import resolve_device

    if options is None:
        options = ReportOptions(data=data, **kwargs)
    elif data is not None or kwargs:
        options = dataclasses.replace(options, **({"data": data} if data else {}), **kwargs)
    say = log or (lambda _msg: None)
    directory = Path(directory)
    meta = read_metadata(directory)
    device = resolve_device(options.device)
    if options.data:
        from symconvert.tasks.data import parse_data_spec

        parse_data_spec(options.data)  # a bad spec fails now, before any measuring

    say(f"loading {directory}")
    model = symconvert.load(directory).eval()
    source = dict(meta["source"])
    parent = _parent(directory, meta)
    kind = "finetuned" if parent is not None or meta.get("finetune") else "converted"
    sources = _SourceCache(source)

    params_after = symconvert.count_parameters(model)
    params_before = symconvert.count_parameters(sources.architecture())
    report: Report = {
        "report_version": REPORT_VERSION,
        "model": _model_name(source),
        "scheme": _scheme_of(meta),
        "directory": str(directory.resolve()),
        "kind": kind,
        "params": {
            "before": params_before,
            "after": params_after,
            "saved": params_before - params_after,
            "saved_fraction": (params_before - params_after) / params_before
            if params_before else 0.0,
        },
    }

    say("writing the dense export to measure its size")
    report["bytes"] = _bytes(directory)

    say("writing every export format (onnx, torchscript; dense and packed) to measure it")
    from symconvert.io.export_packed import measure_deployment

    report["deployment"] = measure_deployment(directory)

    layers, layers_from = _layers(directory, meta, parent, sources)
    report["layers"] = layers
    report["layers_from"] = layers_from

    say("counting FLOPs")
    report["flops"] = _flops(directory, sources, options)

    say(f"timing the folded model and the source ({options.latency_runs} runs each)")
    report["latency"] = _latency(directory, sources, options, device)

    report["accuracy"] = _accuracy(model, directory, meta, parent, kind, sources, options,
                                   device, say)
    report["curves"] = {"finetuned": read_metrics(directory / METRICS_NAME)}

    if options.compare:
        report["compare"] = _compare(report, meta, sources, options, device, say)

    report["provenance"] = _provenance(directory, meta, parent, options, device, report)
    return report


class _SourceCache:
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
            from symconvert.models.sources import create_model_from_source

            self._arch = create_model_from_source(self.source, pretrained=False).eval()
        return self._arch

    def weighted(self) -> nn.Module:
        """The source with its recorded pretrained weights / weights file, shared by the
        measurements that only read it (callers that train get their own ``fresh()``)."""
        if self._weighted is None:
            self._weighted = self.fresh().eval()
        return self._weighted

    def fresh(self) -> nn.Module:
        from symconvert.models.sources import create_model_from_source

        if not self.has_weights:
            raise SymconvertError(
                f"the source {_model_name(self.source)} was converted without pretrained "
                "weights (--no-pretrained): there is no source model to measure")
        return create_model_from_source(self.source)


def _model_name(source: dict[str, Any]) -> str:
    name = str(source.get("name"))
    return name if name.startswith("hf-hub:") else f"{source.get('library')}:{name}"


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


def _bytes(directory: Path) -> dict[str, Any]:
    import symconvert
    from symconvert.io.checkpoint import WEIGHTS_NAME
    from symconvert.io.export import export

    symconvert_bytes = (directory / WEIGHTS_NAME).stat().st_size
    with tempfile.TemporaryDirectory(prefix="symconvert-report-") as tmp:
        path = export(symconvert.load(directory), "dense", Path(tmp) / "dense.safetensors")
        dense = path.stat().st_size
    return {"symconvert": symconvert_bytes, "dense": dense,
            "saved_fraction": (dense - symconvert_bytes) / dense if dense else 0.0}


# ---------------------------------------------------------------------- per layer


def _layers(directory: Path, meta: dict[str, Any], parent: Path | None,
            sources: _SourceCache) -> tuple[list[dict[str, Any]], str]:
    """One entry per converted tensor of ``directory``: from the ``plan.json`` that
    ``convert`` wrote (in DIR or its parent), else recomputed on the source weights."""
    records = meta.get("layers") or {}
    for where in (directory, parent):
        if where is None or not (where / PLAN_NAME).is_file():
            continue
        try:
            plan = json.loads((where / PLAN_NAME).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        by_key = {}
        for entry in plan.get("layers", []):
            if entry.get("action") == "convert":
                by_key[f"{entry['module']}.{entry['tensor']}"] = entry
        # plan.json must describe exactly the tensors this directory holds
        if set(by_key) == set(records) and all(
                by_key[k]["scheme"] == r["scheme"] and list(by_key[k]["shape"]) == r["shape"]
                for k, r in records.items()):
            return [_layer_entry(by_key[k]) for k in records], str(where / PLAN_NAME)
    layers = _recompute_layers(records, sources)
    if any(e["symmetrization_error"] is None for e in layers):
        return layers, "recomputed from the metadata (no source weights: no error)"
    return layers, "recomputed on the source weights"


def _layer_entry(entry: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": entry.get("name") or _display_name(f"{entry['module']}.{entry['tensor']}"),
        "shape": list(entry["shape"]),
        "scheme": entry["scheme"],
        "groups": int(entry.get("groups", 1)),
        "params_before": int(entry["params_before"]),
        "params_after": int(entry["params_after"]),
        "symmetrization_error": entry.get("symmetrization_error"),
        "aliases": list(entry.get("aliases") or []),
        # relative output error on the calibration data (convert --calibrate), else None
        "output_error": entry.get("output_error"),
        "output_error_naive": entry.get("output_error_naive"),
    }


def _display_name(key: str) -> str:
    module, _, tensor = key.rpartition(".")
    return module if tensor == "weight" else key


def _recompute_layers(records: dict[str, Any], sources: _SourceCache) -> list[dict[str, Any]]:
    from symconvert.schemes import get_scheme
    from symconvert.surgery.plan import symmetrization_error

    source_model = None
    if sources.has_weights:
        try:
            source_model = sources.weighted()
        except SymconvertError:  # offline without cached weights: counts only, no error
            source_model = None
    out = []
    for key, record in records.items():
        scheme = get_scheme(record["scheme"])
        shape = tuple(record["shape"])
        groups = int(record.get("groups", 1))
        error = None
        if source_model is not None:
            module_name, _, tensor = key.rpartition(".")
            weight = getattr(source_model.get_submodule(module_name), tensor)
            error = symmetrization_error(scheme, weight.reshape(shape), groups)
        out.append({
            "name": _display_name(key), "shape": list(shape), "scheme": scheme.spec,
            "groups": groups, "params_before": math.prod(shape),
            "params_after": scheme.free_count(shape, groups),
            "symmetrization_error": error, "aliases": list(record.get("aliases") or []),
            "output_error": None, "output_error_naive": None,
        })
    return out


# ----------------------------------------------------------------------- provenance


def _provenance(directory: Path, meta: dict[str, Any], parent: Path | None,
                options: ReportOptions, device: torch.device, report: Report) -> dict[str, Any]:
    import numpy

    from symconvert.io.checkpoint import versions

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


__all__ = ["COMPARE_KINDS", "FORMATS", "ReportOptions", "Section", "build_report",
           "compare_sentence", "count_flops", "median_latency", "parse_compare", "plot_report",
           "read_metrics", "render", "render_json", "render_markdown", "render_table",
           "render_text", "sections"]
