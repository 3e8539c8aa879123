"""The report's measurements of models (``build_report`` calls them): FLOPs and latency of the
folded model against the source, accuracy (or perplexity) of the source, converted, calibrated
and fine-tuned models, and the ``--compare`` baselines (pruned and dense, fine-tuned alike)."""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from symconvert.errors import SymconvertError
from symconvert.report.render import Report, compare_sentence

if TYPE_CHECKING:
    from symconvert.report.build import Log, ReportOptions, _SourceCache


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
    from symconvert.train.loop import FinetuneConfig

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


__all__ = ["LM_SEQUENCE", "count_flops", "median_latency", "read_metrics"]
