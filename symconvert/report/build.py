"""The parameter/accuracy report (SPEC §7): one computation, three renderings, a plot and
the baselines.

``build_report(DIR, data)`` measures everything once and returns a JSON-able dict whose
top-level keys are the contract of SPEC §7.1 (``model``, ``scheme``, ``params``, ``bytes``,
``accuracy``, ``layers``) plus ``flops``, ``latency``, ``curves``, ``compare`` and
``provenance``. ``sections(report)`` turns that dict into titled tables of strings, which
``render_table`` (rich) and ``render_markdown`` print; ``render_json`` dumps the dict. So the
three formats cannot disagree: they format the same numbers with the same functions.

Accuracy entries that could not be measured are absent and carry a ``"reason"`` instead,
never a zero. ``--compare prune`` prunes the source (global L1, same number of removed
parameters) and ``--compare dense`` keeps it dense; both are fine-tuned with the recorded
fine-tuning configuration through ``symconvert.train.loop.fit`` (the loop ``finetune`` runs) and
evaluated on the same split.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from symconvert.errors import SymconvertError

REPORT_VERSION = 1
PLAN_NAME = "plan.json"
METRICS_NAME = "metrics.jsonl"
COMPARE_KINDS = ("prune", "dense")
FORMATS = ("table", "json", "markdown")

Report = dict[str, Any]
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


# ------------------------------------------------------------------ FLOPs, latency


#: what a model with an embedding (a language model) is timed on: tokens[T, B]
LM_SEQUENCE = 35


def _example(model: nn.Module, options: ReportOptions, batch: int) -> torch.Tensor:
    """A zero image batch as the model's config expects (``export.example_input``), with
    the channels its first conv really takes (a timm config does not follow ``in_chans=``)
    and ``--input-size`` applied; token ids ``[35, batch]`` for a model with an embedding."""
    from symconvert.io.export import example_input
    from symconvert.tasks.data import model_in_chans, parse_input_size

    if any(isinstance(m, nn.Embedding) for m in model.modules()):
        return torch.zeros(LM_SEQUENCE, batch, dtype=torch.long)

    x = example_input(model, batch_size=batch)
    chans = model_in_chans(model, getattr(model, "pretrained_cfg", None)) or x.shape[1]
    h, w = parse_input_size(options.input_size) if options.input_size else x.shape[-2:]
    if (chans, h, w) != tuple(x.shape[1:]):
        x = torch.zeros(batch, chans, h, w)
    return x


def count_flops(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward (``torch.utils.flop_counter``: matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(example)
    return int(counter.get_total_flops())


def _flops(directory: Path, sources: _SourceCache, options: ReportOptions) -> dict[str, Any]:
    import symconvert

    folded = symconvert.fold(symconvert.load(directory)).eval()
    example = _example(folded, options, 1)
    try:
        source = count_flops(sources.architecture(), example)
        after = count_flops(folded, example)
    except (RuntimeError, TypeError, ValueError) as exc:
        return {"reason": f"the model does not run on an example input of shape "
                          f"{list(example.shape)} ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200]}); pass --input-size"}
    return {"source": source, "folded": after, "input": list(example.shape),
            "note": "symmetry stores fewer weights but the folded model runs the same dense "
                    "layers, so FLOPs per input do not change"}


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


def _latency(directory: Path, sources: _SourceCache, options: ReportOptions,
             device: torch.device) -> dict[str, Any]:
    import symconvert

    converted = symconvert.load(directory).eval()
    folded = symconvert.fold(symconvert.load(directory)).eval()
    source = sources.architecture()
    if sources.has_weights:
        # Trained weights on both sides: value-dependent CPU paths (denormals) hit alike.
        try:
            source = sources.weighted()
        except SymconvertError:  # offline without cached weights: the architecture times the same
            pass
    example = _example(folded, options, options.latency_batch)
    if example.is_floating_point():
        example = torch.randn(example.shape, generator=torch.Generator().manual_seed(0))
    try:
        ms = median_latency({"source": source, "folded": folded, "converted": converted},
                            example, options.latency_runs, device)
    except (RuntimeError, TypeError, ValueError) as exc:
        return {"reason": f"the model does not run on an example input of shape "
                          f"{list(example.shape)} ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200]}); pass --input-size",
                "batch": options.latency_batch, "device": str(device)}
    finally:
        source.to("cpu")
    return {
        "source_ms": ms["source"], "folded_ms": ms["folded"], "converted_ms": ms["converted"],
        "folded_vs_source": ms["folded"] / ms["source"] if ms["source"] else None,
        "batch": options.latency_batch, "runs": options.latency_runs, "device": str(device),
        "input": list(example.shape),
    }


# ------------------------------------------------------------------------ accuracy


def _eval(model: nn.Module, options: ReportOptions, device: torch.device) -> dict[str, Any]:
    from symconvert.train.evaluate import evaluate

    result = evaluate(model, options.data, batch_size=options.batch_size, device=device,
                      input_size=options.input_size, subsample=options.subsample,
                      workers=options.workers)
    model.to("cpu")
    return result


def _scores(result: dict[str, Any]) -> dict[str, Any]:
    return {k: result[k] for k in ("top1", "top5", "perplexity") if k in result}


def _accuracy(model: nn.Module, directory: Path, meta: dict[str, Any], parent: Path | None,
              kind: str, sources: _SourceCache, options: ReportOptions,
              device: torch.device, say: Log) -> dict[str, Any]:
    import symconvert

    if not options.data:
        return {"reason": "no --data given: pass --data SPEC (e.g. --data digits) to measure "
                          "top-1/top-5 of the source, converted and fine-tuned models"}
    acc: dict[str, Any] = {}
    # The model in DIR first: a data error there is the user's to fix (exit 2), not a reason.
    say(f"evaluating {kind} model on {options.data}")
    own = _eval(model, options, device)
    acc["split"], acc["n"] = own.get("split"), own.get("n")

    say("evaluating the source model")
    try:
        acc["source"] = _scores(_eval(_same_corpus(sources.weighted(), meta), options, device))
    except SymconvertError as exc:
        acc["source"] = {"reason": str(exc)}

    if kind == "converted":
        acc["converted"] = _scores(own)
        acc["finetuned"] = {"reason": f"{directory} has not been fine-tuned: run "
                                      f"`symconvert finetune {directory} --data SPEC`"}
    else:
        if parent is None:
            acc["converted"] = {"reason": "the metadata records no parent (converted) directory"}
        elif not (parent / "model.safetensors").is_file():
            acc["converted"] = {"reason": f"the converted parent directory {parent} is gone"}
        else:
            say(f"evaluating the converted model before fine-tuning ({parent})")
            try:
                acc["converted"] = _scores(_eval(_same_corpus(symconvert.load(parent), meta),
                                                 options, device))
            except SymconvertError as exc:
                acc["converted"] = {"reason": str(exc)}
        acc["finetuned"] = _scores(own)
    _calibrated_accuracy(acc, model, directory, meta, parent, kind, sources, options, device, say)
    return {k: acc[k] for k in ("source", "converted", "calibrated", "finetuned", "split", "n")}


def _calibrated_accuracy(acc: dict[str, Any], model: nn.Module, directory: Path,
                         meta: dict[str, Any], parent: Path | None, kind: str,
                         sources: _SourceCache, options: ReportOptions, device: torch.device,
                         say: Log) -> None:
    """With calibration (``convert --calibrate``) the row "converted" is the naive
    conversion (nearest symmetric weights, rebuilt from the source) and "calibrated" the
    calibrated directory before any fine-tuning."""
    import symconvert
    from symconvert.surgery.calibrate import naive_from

    cal_dir = directory if kind == "converted" else parent
    try:
        cal_meta = meta if kind == "converted" else (
            symconvert.read_metadata(parent) if parent is not None else {})
    except SymconvertError:
        cal_meta = {}
    if not cal_meta.get("calibration"):
        acc["calibrated"] = {"reason": "not calibrated (convert --calibrate DATA)"}
        return
    calibrated = acc["converted"]
    acc["calibrated"] = calibrated
    say("evaluating the naive conversion (nearest symmetric weights of the source)")
    try:
        base = model if kind == "converted" else symconvert.load(cal_dir)
        acc["converted"] = _scores(_eval(naive_from(base, sources.weighted()), options, device))
    except SymconvertError as exc:
        acc["converted"] = {"reason": str(exc)}


def _same_corpus(model: nn.Module, meta: dict[str, Any]) -> nn.Module:
    """A language model's siblings read the text as the measured model did (its recorded
    files and vocabulary), so that word ids and the evaluation text are the same."""
    if meta.get("lm") and not (getattr(model, "symconvert_metadata", None) or {}).get("lm"):
        model.symconvert_metadata = {**(getattr(model, "symconvert_metadata", None) or {}),
                                     "lm": meta["lm"]}
    return model


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


# ------------------------------------------------------------------------ baselines


def _finetune_config(meta: dict[str, Any], options: ReportOptions, device: torch.device):
    """The recorded fine-tuning configuration (None when DIR was not fine-tuned)."""
    from symconvert.train.config import FinetuneConfig

    args = (meta.get("finetune") or {}).get("args")
    if not args:
        return None, None
    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    config = FinetuneConfig(**{k: v for k, v in args.items() if k in names})
    # Same machine as every other number of the report; the trajectory flags stay recorded.
    config = dataclasses.replace(config, device=str(device))
    return config, args.get("data") or options.data


def _compare(report: Report, meta: dict[str, Any], sources: _SourceCache,
             options: ReportOptions, device: torch.device, say: Log) -> dict[str, Any]:
    import symconvert
    from symconvert.io.export import export as export_model
    from symconvert.report.prune import count_nonzero, make_permanent, prune_global_l1
    from symconvert.surgery.plan import count_parameters
    from symconvert.train.loop import fit

    if not sources.has_weights:
        raise SymconvertError(
            f"--compare needs the pretrained source: {report['model']} was converted with "
            "--no-pretrained, so there is no source model to prune or fine-tune.")
    config, train_data = _finetune_config(meta, options, device)
    removed = report["params"]["saved"]
    acc = report["accuracy"]
    sym_scores = acc.get("finetuned") if report["kind"] == "finetuned" else acc.get("converted")
    # "before fine-tuning": what each compression alone costs, before any training
    sym_before = acc.get("converted") if report["kind"] == "finetuned" else None
    if sym_before is not None and "top1" in (acc.get("calibrated") or {}):
        sym_before = acc["calibrated"]  # the fine-tune started from the calibrated model
    out: dict[str, Any] = {
        "budget": ({"fine_tuned": True, "data": train_data, "epochs": config.epochs,
                    "distill": config.distill, "lr": config.lr, "opt": config.opt,
                    "batch_size": config.batch_size, "seed": config.seed}
                   if config is not None else
                   {"fine_tuned": False, "note": "the directory was not fine-tuned, so neither "
                                                 "are the baselines"}),
        "removed": removed,
        "n": acc.get("n"),
        "symmetric": {
            "label": f"symmetric ({report['scheme']})",
            "params_stored": report["params"]["after"],
            "params_nonzero": count_nonzero(symconvert.load(report["directory"])),
            "bytes": report["bytes"]["symconvert"],
            **_scores(sym_scores or {}),
            "before_finetune": _scores(sym_before or {}),
        },
    }
    for kind in options.compare:
        say(f"baseline {kind}: building the source")
        model = sources.fresh()
        _same_corpus(model, meta)
        entry: dict[str, Any] = {}
        if kind == "prune":
            pool = prune_global_l1(model, removed)
            entry.update(label="global L1 magnitude pruning", pool=pool,
                         note="unstructured zeros do not shrink a dense file: the pruned "
                              "model is stored with its zeros, as large as the source")
            say("baseline prune: evaluating before fine-tuning")
            entry["before_finetune"] = _scores(_eval(model, options, device))
        else:
            entry.update(label="dense (source, fine-tuned)",
                         note="the control: same fine-tuning, no compression",
                         before_finetune=_scores(acc.get("source") or {}))
        if config is not None:
            say(f"baseline {kind}: fine-tuning {config.epochs} epoch(s) on {train_data}")
            teacher = sources.fresh() if config.distill else None
            with tempfile.TemporaryDirectory(prefix=f"symconvert-{kind}-") as tmp:
                result = fit(model, train_data, tmp, config, teacher=teacher,
                             progress=options.progress)
            entry["curve"] = result.metrics
        model = make_permanent(model).cpu().eval()
        say(f"baseline {kind}: evaluating")
        entry.update(_scores(_eval(model, options, device)))
        entry["params_stored"] = count_parameters(model)
        entry["params_nonzero"] = count_nonzero(model)
        with tempfile.TemporaryDirectory(prefix="symconvert-report-") as tmp:
            entry["bytes"] = export_model(model, "dense", Path(tmp) / "m.safetensors").stat().st_size
        out[kind] = entry
    out["summary"] = compare_sentence(out)
    return out


def compare_sentence(compare: dict[str, Any]) -> str:
    """One sentence: which won at the same parameter budget and by how much."""
    sym = compare["symmetric"]
    parts = []
    if "perplexity" in sym:
        return _perplexity_sentence(compare)
    if "top1" not in sym:
        return "The symmetric model has no top-1 to compare."
    n = compare.get("n")

    def images(diff_pt: float) -> str:
        # on a small eval split a point is a handful of images: say how many
        return f" = {round(abs(diff_pt) * n / 100)} of {n:,} images" if n else ""

    if "prune" in compare and "top1" in compare["prune"]:
        diff = (sym["top1"] - compare["prune"]["top1"]) * 100
        verdict = ("symmetry wins" if diff > 0 else "pruning wins" if diff < 0 else "a tie")
        margin = f" by {abs(diff):.2f} pt{images(diff)}" if diff else ""
        parts.append(
            f"with {compare['removed']:,} parameters removed from each, {sym['label']} reaches "
            f"{fmt_pct(sym['top1'])} top-1 and magnitude pruning {fmt_pct(compare['prune']['top1'])}"
            f" ({verdict}{margin}), but only the symmetric file is smaller "
            f"({sym['bytes']:,} vs {compare['prune']['bytes']:,} bytes)")
    if "dense" in compare and "top1" in compare["dense"]:
        diff = (compare["dense"]["top1"] - sym["top1"]) * 100
        cost = (f"symmetry costs {diff:.2f} pt{images(diff)}" if diff > 0 else
                f"symmetry is {-diff:.2f} pt ahead{images(diff)}" if diff < 0 else
                "no difference")
        parts.append(f"the dense control fine-tuned with the same budget reaches "
                     f"{fmt_pct(compare['dense']['top1'])} ({cost})")
    text = "; ".join(parts)
    return (text[0].upper() + text[1:] + ".") if text else ""


def _perplexity_sentence(compare: dict[str, Any]) -> str:
    """``compare_sentence`` for a language model: perplexity, lower is better."""
    sym = compare["symmetric"]
    parts = []
    for kind, what in (("prune", "magnitude pruning at the same parameter count"),
                       ("dense", "the dense control fine-tuned with the same budget")):
        other = (compare.get(kind) or {}).get("perplexity")
        if other is None:
            continue
        ratio = sym["perplexity"] / other - 1
        parts.append(f"{what} reaches perplexity {other:.2f} against {sym['perplexity']:.2f} "
                     f"for {sym['label']} ({ratio:+.1%})")
    text = "; ".join(parts)
    return (text[0].upper() + text[1:] + ".") if text else ""


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


# ------------------------------------------------------------------------ rendering


def fmt_int(n: int | None) -> str:
    return "—" if n is None else f"{n:,}"


def fmt_pct(x: float | None) -> str:
    return "—" if x is None else f"{x * 100:.2f} %"


def fmt_ms(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f} ms"


def fmt_err(x: float | None) -> str:
    return "—" if x is None else f"{x:.4f}"


def fmt_ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}×"


@dataclass
class Section:
    """One titled table of already-formatted cells; the renderers only lay it out."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    right: list[bool] = field(default_factory=list)  # right-justify column i
    note: str | None = None


def _perplexity_report(acc: dict[str, Any]) -> bool:
    """A language model's report: its entries are perplexities (lower is better)."""
    return any(isinstance(acc.get(k), dict) and "perplexity" in acc[k]
               for k in ("source", "converted", "finetuned"))


def fmt_ppl(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def _ppl_cells(entry: dict[str, Any] | None) -> list[str]:
    if not entry or "reason" in entry:
        return ["—", f"not measured: {(entry or {}).get('reason', 'not measured')}"]
    return [fmt_ppl(entry.get("perplexity")), ""]


def _acc_cells(entry: dict[str, Any] | None) -> list[str]:
    if not entry or "reason" in entry:
        reason = (entry or {}).get("reason", "not measured")
        return ["—", "—", f"not measured: {reason}"]
    note = f"perplexity {entry['perplexity']:.2f}" if "perplexity" in entry else ""
    return [fmt_pct(entry.get("top1")), fmt_pct(entry.get("top5")), note]


def sections(report: Report) -> list[Section]:
    """The report as tables of strings: what ``render_table`` and ``render_markdown`` show."""
    p, b, f, lat = report["params"], report["bytes"], report["flops"], report["latency"]
    notes = ["bytes: dense = the folded export (`symconvert export --format dense`)."]
    if "reason" in lat:
        notes.append(f"latency not measured: {lat['reason']}.")
    else:
        notes.append(f"latency: median of {lat.get('runs')} runs, the symmetric model folded; "
                     f"unfolded it takes {fmt_ms(lat['converted_ms'])}.")
    if "reason" in f:
        notes.append(f"FLOPs not counted: {f['reason']}.")
    out = [Section(
        title=f"{report['model']} — {report['scheme']} ({report['kind']})",
        columns=["quantity", "source / dense", "symmetric", "change"],
        right=[False, True, True, True],
        rows=[
            ["parameters", fmt_int(p["before"]), fmt_int(p["after"]),
             f"−{fmt_int(p['saved'])} (−{fmt_pct(p['saved_fraction'])})"],
            ["bytes on disk", fmt_int(b["dense"]), fmt_int(b["symconvert"]),
             f"−{fmt_pct(b['saved_fraction'])}"],
            ["FLOPs per input", fmt_int(f.get("source")), fmt_int(f.get("folded")),
             fmt_ratio(f["folded"] / f["source"] if f.get("source") else None)],
            [f"latency, batch {lat['batch']} ({lat['device']})", fmt_ms(lat.get("source_ms")),
             fmt_ms(lat.get("folded_ms")), fmt_ratio(lat.get("folded_vs_source"))],
        ],
        note=" ".join(notes),
    )]

    acc = report["accuracy"]
    if "reason" in acc and not any(k in acc for k in ("source", "converted", "finetuned")):
        out.append(Section(title="accuracy", columns=["model", "top-1", "top-5", "note"],
                           right=[False, True, True, False],
                           rows=[[m, "—", "—", f"not measured: {acc['reason']}"]
                                 for m in ("source", "converted", "fine-tuned")]))
    elif _perplexity_report(acc):
        out.append(Section(
            title=f"perplexity on the {acc.get('split')} split ({fmt_int(acc.get('n'))} tokens)",
            columns=["model", "perplexity", "note"], right=[False, True, False],
            rows=[[label, *_ppl_cells(acc.get(key))] for key, label in
                  (("source", "source"), ("converted", "converted, before fine-tuning"),
                   ("finetuned", "fine-tuned"))]))
    else:
        out.append(Section(
            title=f"accuracy on the {acc.get('split')} split (n = {fmt_int(acc.get('n'))})",
            columns=["model", "top-1", "top-5", "note"], right=[False, True, True, False],
            rows=[[label, *_acc_cells(acc.get(key))] for key, label in
                  (("source", "source"), ("converted", "converted, before fine-tuning"),
                   ("calibrated", "converted, calibrated"),
                   ("finetuned", "fine-tuned"))]))

    cmp_ = report.get("compare")
    if cmp_:
        rows = []
        ppl = _perplexity_report(acc)
        for key in ("symmetric", *COMPARE_KINDS):
            e = cmp_.get(key)
            if not e:
                continue
            before = e.get("before_finetune") or {}
            scores = ([fmt_ppl(before.get("perplexity")), fmt_ppl(e.get("perplexity"))] if ppl
                      else [fmt_pct(before.get("top1")), fmt_pct(e.get("top1")),
                            fmt_pct(e.get("top5"))])
            rows.append([e["label"], fmt_int(e["params_stored"]), fmt_int(e["params_nonzero"]),
                         fmt_int(e["bytes"]), *scores])
        budget = cmp_["budget"]
        budget_text = (f"Budget: {budget['epochs']} epoch(s) on {budget['data']}, distillation "
                       f"{'on' if budget['distill'] else 'off'}, seed {budget['seed']}"
                       if budget.get("fine_tuned") else f"Budget: {budget['note']}")
        notes = [cmp_["summary"], budget_text + "."] + [
            f"{cmp_[k]['label'][0].upper()}{cmp_[k]['label'][1:]}: {cmp_[k]['note']}."
            for k in COMPARE_KINDS if k in cmp_]
        out.append(Section(
            title=f"side by side, {fmt_int(cmp_['removed'])} parameters removed",
            columns=["model", "params stored", "params non-zero", "file bytes",
                     *(["perplexity before FT", "perplexity"] if ppl else
                       ["top-1 before FT", "top-1", "top-5"])],
            right=[False] + [True] * (len(rows[0]) - 1 if rows else 6), rows=rows,
            note=" ".join(notes)))

    dep = report.get("deployment")
    if dep:
        out.append(_deployment_section(dep))

    layer_rows = [[e["name"], "×".join(str(s) for s in e["shape"]), e["scheme"],
                   fmt_int(e["params_before"]), fmt_int(e["params_after"]),
                   fmt_err(e["symmetrization_error"]), fmt_err(e.get("output_error"))]
                  for e in report["layers"]]
    out.append(Section(
        title=f"per layer ({len(layer_rows)} converted)",
        columns=["layer", "shape", "scheme", "params before", "params after", "sym. error",
                 "output error"],
        right=[False, False, False, True, True, True, True], rows=layer_rows,
        note="sym. error = ‖W − unpack(pack(W))‖ / ‖W‖ on the source weights; output error = "
             "relative error of the layer's output on the calibration data after the "
             "least-squares fit (convert --calibrate; — without); rows from "
             f"{report.get('layers_from')}."))

    prov = report["provenance"]
    v = prov["versions"]
    out.append(Section(
        title="provenance", columns=["", ""], right=[False, False],
        rows=[
            ["directory", report["directory"]],
            ["data", f"{prov['data'] or '—'} (split {prov['split'] or '—'}, "
                     f"n = {fmt_int(prov['n'])})"],
            ["device", prov["device"]],
            ["versions", ", ".join(f"{k} {v[k]}" for k in v)],
            ["convert", _args_text(prov.get("convert"))],
            ["finetune", _args_text(prov.get("finetune"))],
            ["parent", prov.get("parent") or "—"],
        ]))
    return out


def _deployment_section(dep: dict[str, Any]) -> Section:
    dtypes = list(dep.get("by_dtype", {}))
    labels = {"symconvert": "symconvert directory", "dense_onnx": "ONNX, dense",
              "packed_onnx": "ONNX, --packed", "dense_torchscript": "TorchScript, dense",
              "packed_torchscript": "TorchScript, --packed"}
    rows = []
    for key, label in labels.items():
        by = {d: dep["by_dtype"][d].get("dense" if key.startswith("dense") else key)
              for d in dtypes}
        measured = fmt_int(dep.get(key)) if key in dep else \
            f"— ({dep.get('reasons', {}).get(key, 'not written')})"
        rows.append([label, measured, *[fmt_int(by[d]) for d in dtypes]])
    return Section(
        title="deployment: bytes of what you ship",
        columns=["format", f"file bytes ({dep.get('stored_dtype', 'float32')})",
                 *[f"tensors, {d}" for d in dtypes]],
        right=[False, True, *[True] * len(dtypes)], rows=rows,
        note=(f"file bytes: written and measured (`symconvert export --format F [--packed]`); "
              f"tensors: what each format stores per --dtype, packed ones including "
              f"{fmt_int(dep.get('index_bytes'))} bytes of int32 index tables; a dense ONNX "
              "file is smaller by the BatchNorms the exporter folds."))


def _args_text(args: dict[str, Any] | None) -> str:
    if not args:
        return "—"
    return " ".join(f"{k}={json.dumps(v)}" for k, v in args.items() if v not in (None, [], {}))


def render_json(report: Report) -> str:
    return json.dumps(report, indent=2, default=str)


def render_markdown(report: Report) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [f"# symconvert report: {cell(report['model'])}", ""]
    for sec in sections(report):
        lines += [f"## {cell(sec.title)}", ""]
        lines.append("| " + " | ".join(cell(c) or " " for c in sec.columns) + " |")
        lines.append("|" + "|".join("---:" if (sec.right[i] if i < len(sec.right) else False)
                                    else "---" for i in range(len(sec.columns))) + "|")
        for row in sec.rows:
            lines.append("| " + " | ".join(cell(c) for c in row) + " |")
        if sec.note:
            lines += ["", cell(sec.note)]
        lines.append("")
    return "\n".join(lines)


def render_table(report: Report) -> list[Any]:
    """rich renderables (one Table per section) for ``console.print(*render_table(r))``."""
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    out: list[Any] = [Text(f"symconvert report: {report['model']}", style="bold")]
    for sec in sections(report):
        table = Table(title=escape(sec.title), title_justify="left", show_header=any(sec.columns))
        for i, col in enumerate(sec.columns):
            table.add_column(escape(col), justify="right" if (sec.right[i] if i < len(
                sec.right) else False) else "left", overflow="fold")
        for row in sec.rows:
            table.add_row(*(escape(c) for c in row))
        out.append(table)
        if sec.note:
            out.append(Text(sec.note, style="dim"))
    return out


def render_text(report: Report, width: int = 160) -> str:
    """The rich table as plain text (for ``--out FILE`` and tests)."""
    from rich.console import Console

    console = Console(width=width, record=True, file=open(os.devnull, "w"),  # noqa: SIM115
                      color_system=None)
    for item in render_table(report):
        console.print(item)
    text = console.export_text()
    console.file.close()
    return text


def render(report: Report, fmt: str) -> str:
    if fmt not in FORMATS:
        raise SymconvertError(f"--format {fmt!r}: choose from {', '.join(FORMATS)}.")
    if fmt == "json":
        return render_json(report)
    if fmt == "markdown":
        return render_markdown(report)
    return render_text(report)


# ---------------------------------------------------------------------------- plot


def plot_report(report: Report, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write a PNG: per-layer parameters before/after, per-layer symmetrisation error,
    the fine-tuning curves (DIR/metrics.jsonl, and the baselines' when compared) and the
    accuracy of every model measured. At least 1400×1000 pixels."""
    import matplotlib

    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise SymconvertError(f"--plot {path}: write a .png file (e.g. --plot report.png).")
    if path.parent and not path.parent.exists():
        raise SymconvertError(f"--plot {path}: the folder {path.parent} does not exist.")
    layers = report["layers"]
    n = max(len(layers), 1)
    height = max(10.0, 4.0 + 0.32 * n)
    fig, axes = plt.subplots(2, 2, figsize=(16, height), dpi=dpi,
                             gridspec_kw={"height_ratios": [max(1.0, n / 12), 1.0]})
    fig.suptitle(f"symconvert report — {report['model']}, {report['scheme']}: parameters "
                 f"{report['params']['before']:,} → {report['params']['after']:,} "
                 f"(−{report['params']['saved_fraction']:.1%})", fontsize=15)
    names = [e["name"] for e in layers]
    ys = list(range(len(layers)))
    label_size = 11 if n <= 20 else 9 if n <= 40 else 7

    ax = axes[0][0]
    if layers:
        ax.barh([y - 0.2 for y in ys], [e["params_before"] for e in layers], height=0.4,
                label="before", color="#9aa9bd")
        ax.barh([y + 0.2 for y in ys], [e["params_after"] for e in layers], height=0.4,
                label="after (free parameters)", color="#2b6cb0")
        ax.set_yticks(ys, names, fontsize=label_size)
        ax.invert_yaxis()
        ax.legend(fontsize=11)
    else:
        ax.text(0.5, 0.5, "no converted layers", ha="center", va="center", fontsize=13)
    ax.set_title("parameters per converted layer", fontsize=13)
    ax.set_xlabel("parameters", fontsize=12)

    ax = axes[0][1]
    errors = [e["symmetrization_error"] for e in layers]
    if layers and any(x is not None for x in errors):
        ax.barh(ys, [x or 0.0 for x in errors], color="#c05621")
        ax.set_yticks(ys, names, fontsize=label_size)
        ax.invert_yaxis()
    else:
        ax.text(0.5, 0.5, "symmetrisation error not available", ha="center", va="center",
                fontsize=13)
    ax.set_title("symmetrisation error ‖W − unpack(pack(W))‖ / ‖W‖ (source weights)",
                 fontsize=12)
    ax.set_xlabel("relative Frobenius distance", fontsize=12)

    _plot_curves(axes[1][0], report)
    _plot_accuracy(axes[1][1], report)
    for row in axes:
        for a in row:
            a.tick_params(axis="x", labelsize=11)
            a.grid(axis="x", alpha=0.3)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    from symconvert.io.files import atomic_write

    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    finally:
        plt.close(fig)
    return path


def _plot_curves(ax: Any, report: Report) -> None:
    # epoch 0 = before fine-tuning (the converted / pruned / source model), when measured
    acc = report.get("accuracy") or {}
    # a language model's curve is its eval perplexity (raw), a classifier's top-1 (in %)
    key, scale, name = (("perplexity", 1.0, "eval perplexity") if _perplexity_report(acc)
                        else ("top1", 100.0, "eval top-1 (%)"))
    start = {"symmetric": (acc.get("converted") or {}).get(key)}
    curves = {"symmetric": (report.get("curves") or {}).get("finetuned") or []}
    for kind in COMPARE_KINDS:
        entry = (report.get("compare") or {}).get(kind) or {}
        if entry.get("curve"):
            curves[kind] = entry["curve"]
            start[kind] = (entry.get("before_finetune") or {}).get(key)
    drawn = False
    loss_ax = None
    for (label, rows), color in zip(curves.items(), ("#2b6cb0", "#c05621", "#2f855a"), strict=False):
        pts = [(r.get("epoch", i + 1), scale * r[f"eval_{key}"]) for i, r in enumerate(rows)
               if isinstance(r.get(f"eval_{key}"), (int, float))]
        if pts and start.get(label) is not None:
            pts.insert(0, (0, scale * start[label]))
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", color=color,
                    label=f"{label}: {name.split(' (')[0]}")
            drawn = True
        loss = [(r.get("epoch", i + 1), r["train_loss"]) for i, r in enumerate(rows)
                if isinstance(r.get("train_loss"), (int, float))]
        if loss:
            loss_ax = loss_ax or ax.twinx()
            loss_ax.plot(*zip(*loss, strict=True), linestyle="--", marker="x", color=color,
                         label=f"{label}: train loss")
            drawn = True
    if not drawn:
        ax.text(0.5, 0.5, "no fine-tuning metrics (metrics.jsonl)", ha="center", va="center",
                fontsize=13)
    else:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch (0 = before fine-tuning)", fontsize=12)
        ax.set_ylabel(name, fontsize=12)
        handles, labels = ax.get_legend_handles_labels()
        if loss_ax is not None:
            loss_ax.set_ylabel("train loss", fontsize=12)
            h2, l2 = loss_ax.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        ax.legend(handles, labels, fontsize=10, loc="center right")
    ax.set_title("fine-tuning curves", fontsize=13)


def _plot_accuracy(ax: Any, report: Report) -> None:
    acc = report["accuracy"]
    ppl = _perplexity_report(acc)
    key, scale, name = ("perplexity", 1.0, "perplexity") if ppl else ("top1", 100.0, "top-1 (%)")
    bars = [(label, acc[k][key]) for k, label in
            (("source", "source"), ("converted", "converted\n(before FT)"),
             ("calibrated", "calibrated\n(before FT)"), ("finetuned", "fine-tuned"))
            if isinstance(acc.get(k), dict) and key in acc[k]]
    for kind in COMPARE_KINDS:
        entry = (report.get("compare") or {}).get(kind) or {}
        if key in entry:
            bars.append((f"{kind}\nbaseline", entry[key]))
    if not bars:
        ax.text(0.5, 0.5, f"accuracy not measured:\n{acc.get('reason', '')[:60]}",
                ha="center", va="center", fontsize=13)
    else:
        labels, values = zip(*bars, strict=True)
        ax.bar(labels, [v * scale for v in values], color="#4a5568")
        for i, v in enumerate(values):
            ax.text(i, v * scale, f"{v * scale:.2f}", ha="center", va="bottom", fontsize=11)
        ax.set_ylabel(name, fontsize=12)
        if not ppl:
            low = min(values) * 100
            ax.set_ylim(max(0.0, low - 10), 108)  # headroom for the value labels
        ax.tick_params(axis="x", labelsize=11)
    ax.set_title(f"{name.split(' (')[0]} on the {acc.get('split', 'eval')} split", fontsize=13)


__all__ = ["COMPARE_KINDS", "FORMATS", "ReportOptions", "Section", "build_report",
           "compare_sentence", "count_flops", "median_latency", "parse_compare", "plot_report",
           "read_metrics", "render", "render_json", "render_markdown", "render_table",
           "render_text", "sections"]
