"""The peers of ``report --compare``: what users pick instead of symmetry, built from the
source at the symmetric model's budget. ``structured`` (Torch-Pruning, really smaller
layers) and ``lowrank`` (truncated SVD, whitened by the calibration inputs when the model
was calibrated) here; ``prune`` and ``dense`` in ``symconvert.report.compare``.

A baseline function gets the fresh source and a ``Job`` and returns a ``Baseline``: the
compressed model and its entry so far (label, note, how close to the budget, the score
before fine-tuning), or an entry with a ``reason`` and no model when the method cannot
reach the budget on this model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from symconvert.errors import SymconvertError
from symconvert.report.accuracy import Log, evaluate_on
from symconvert.report.lowrank import LowRankError, factorize
from symconvert.report.measure import count_flops, median_latency
from symconvert.report.options import ReportOptions
from symconvert.report.structured import StructuredError, prune_structured
from symconvert.tasks import Task
from symconvert.tasks.data import create_loaders


@dataclasses.dataclass
class Job:
    """What every baseline is built against."""

    removed: int  # parameters the symmetric model removes
    task: Task
    acc: dict[str, Any]  # the report's accuracy section
    options: ReportOptions
    device: torch.device
    say: Log
    meta: dict[str, Any]  # the directory's metadata


@dataclasses.dataclass
class Baseline:
    """What a baseline function hands back: the compressed model (None when the method
    cannot reach the budget: the entry's ``reason`` says why) and its entry so far."""

    model: nn.Module | None
    entry: dict[str, Any]


def _budget_keys(job: Job, removed: int, step: int) -> dict[str, Any]:
    return {"removed": removed, "difference": job.removed - removed, "step": step}


def structured(model: nn.Module, job: Job) -> Baseline:
    label = "structured pruning (Torch-Pruning DepGraph, L1)"
    x = job.task.example_inputs(model, 1, job.options.input_size)[0]
    job.say("baseline structured: searching the pruning ratio that removes the budget")
    try:
        pruned = prune_structured(model, job.removed, x)
    except StructuredError as exc:
        return Baseline(None, {"label": label, "reason": str(exc)})
    entry = {"label": label, **_budget_keys(job, pruned.removed, pruned.step),
             "scope": pruned.scope, "groups": pruned.groups, "ratio": pruned.ratio,
             "note": f"channels removed, layers really smaller; {pruned.note}"}
    job.say("baseline structured: evaluating before fine-tuning")
    entry["before_finetune"] = job.task.scores(evaluate_on(pruned.model, job.options,
                                                           job.device))
    return Baseline(pruned.model, entry)


def calibration_spec(meta: dict[str, Any]) -> tuple[str | None, int]:
    """The calibration data convert recorded (a --data spec) and its sample count."""
    convert = meta.get("convert") or {}
    spec = convert.get("calibrate")
    if not isinstance(spec, str) or not spec:
        spec = (meta.get("calibration") or {}).get("data")
    samples = int(convert.get("calibration_samples") or 512)
    return (spec if isinstance(spec, str) and spec else None), samples


def calibration_inputs(spec: str, model: nn.Module, samples: int,
                       options: ReportOptions) -> Iterator[torch.Tensor]:
    """The first ``samples`` inputs of the train split of ``spec`` (seeded, unaugmented)."""
    loaders = create_loaders(spec, model, batch_size=64, augment=False, seed=0,
                             input_size=options.input_size)
    loader = loaders.train if loaders.train is not None else loaders.eval
    seen = 0
    for batch in loader:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        x = x[: samples - seen]
        seen += len(x)
        yield x
        if seen >= samples:
            return


def lowrank(model: nn.Module, job: Job) -> Baseline:
    spec, samples = calibration_spec(job.meta)
    label = "low-rank (truncated SVD" + (", whitened by calibration)" if spec else ")")
    batches = None
    if spec:
        job.say(f"baseline lowrank: input statistics on {samples} inputs of {spec}")
        try:
            batches = calibration_inputs(spec, model, samples, job.options)
        except SymconvertError as exc:
            return Baseline(None, {"label": label, "reason": f"calibration data: {exc}"})
    try:
        low = factorize(model, job.removed, batches)
    except LowRankError as exc:
        return Baseline(None, {"label": label, "reason": str(exc)})
    how = (f"SVD of W·L, L the Cholesky factor of the inputs' X·Xᵀ on {samples} inputs of "
           f"{spec} (SVD-LLM)" if spec else "plain SVD (the model was not calibrated)")
    entry = {"label": label, **_budget_keys(job, low.removed, low.step),
             "layers": len(low.ranks), "energy": low.energy, "whitened": low.whitened,
             "ranks": low.ranks,
             "note": f"{len(low.ranks)} layers each replaced by two smaller ones, ranks at "
                     f"one energy threshold ({low.energy:.4f}); {how}"}
    job.say("baseline lowrank: evaluating before fine-tuning")
    entry["before_finetune"] = job.task.scores(evaluate_on(low.model, job.options, job.device))
    return Baseline(low.model, entry)


def speed(model: nn.Module, source: nn.Module, job: Job) -> dict[str, Any]:
    """FLOPs of one input and latency (median, interleaved with the source) of ``model``."""
    options = job.options
    x = job.task.example_inputs(source, options.latency_batch, options.input_size)[0]
    if x.is_floating_point():
        x = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    try:
        out = {"flops": count_flops(model, x[:1])}
        ms = median_latency({"source": source, "model": model}, x, options.latency_runs,
                            job.device)
    except (RuntimeError, TypeError, ValueError) as exc:
        return {"speed_reason": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    finally:
        model.to("cpu")
        source.to("cpu")
    out.update(latency_ms=ms["model"], latency_source_ms=ms["source"],
               latency_vs_source=ms["model"] / ms["source"] if ms["source"] else None)
    return out


PEERS: dict[str, Callable[[nn.Module, Job], Baseline]] = {"structured": structured,
                                                          "lowrank": lowrank}

__all__ = ["PEERS", "Baseline", "Job", "calibration_inputs", "calibration_spec", "speed"]
