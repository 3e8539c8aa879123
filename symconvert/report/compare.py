"""``--compare``: baselines at the same parameter budget, fine-tuned with the recorded
fine-tuning configuration through ``symconvert.train.loop.fit`` (the loop ``finetune`` runs)
and evaluated on the same split, with bytes, FLOPs and latency. ``structured`` (Torch-Pruning)
and ``lowrank`` (truncated SVD) are in ``symconvert.report.peers``; ``prune`` prunes the
source (global L1, the same number of removed parameters); ``dense`` keeps it dense (the
control).

A baseline is one function in ``BASELINES`` (its name also in
``symconvert.report.options.COMPARE_KINDS``): it gets the fresh source model and a ``Job``
and returns it compressed, with the entry's label, note and score before fine-tuning (or no
model and an entry with the ``reason`` it cannot reach the budget).
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from symconvert.errors import SymconvertError
from symconvert.io.loading import load
from symconvert.report.accuracy import Log, evaluate_on
from symconvert.report.measure import dense_bytes
from symconvert.report.options import ReportOptions
from symconvert.report.peers import PEERS, Baseline, Job, speed
from symconvert.report.prune import count_nonzero, make_permanent, prune_global_l1
from symconvert.report.render import Report, compare_sentence
from symconvert.report.sources import SourceCache
from symconvert.surgery.plan import count_parameters
from symconvert.tasks import Task
from symconvert.train.config import FinetuneConfig
from symconvert.train.loop import fit


def _prune(model: nn.Module, job: Job) -> Baseline:
    pool = prune_global_l1(model, job.removed)
    entry = {"label": "global L1 magnitude pruning", "pool": pool,
             "note": "unstructured zeros do not shrink a dense file: the pruned model is "
                     "stored with its zeros, as large as the source"}
    job.say("baseline prune: evaluating before fine-tuning")
    entry["before_finetune"] = job.task.scores(evaluate_on(model, job.options, job.device))
    return Baseline(model, entry)


def _dense(model: nn.Module, job: Job) -> Baseline:
    return Baseline(model, {"label": "dense (source, fine-tuned)",
                            "note": "the control: same fine-tuning, no compression",
                            "before_finetune": job.task.scores(job.acc.get("source") or {})})


BASELINES: dict[str, Callable[[nn.Module, Job], Baseline]] = {
    **PEERS, "prune": _prune, "dense": _dense}


def recorded_config(meta: dict[str, Any], options: ReportOptions, device: torch.device
                    ) -> tuple[FinetuneConfig | None, str | None]:
    """The recorded fine-tuning configuration and data (None when DIR was not fine-tuned)."""
    args = (meta.get("finetune") or {}).get("args")
    if not args:
        return None, None
    names = set(FinetuneConfig.names())
    config = FinetuneConfig(**{k: v for k, v in args.items() if k in names})
    # Same machine as every other number of the report; the trajectory flags stay recorded.
    config = dataclasses.replace(config, device=str(device))
    return config, args.get("data") or options.data


def _budget(config: FinetuneConfig | None, data: str | None) -> dict[str, Any]:
    if config is None:
        return {"fine_tuned": False, "note": "the directory was not fine-tuned, so neither "
                                             "are the baselines"}
    return {"fine_tuned": True, "data": data, "epochs": config.epochs,
            "distill": config.distill, "lr": config.lr, "opt": config.opt,
            "batch_size": config.batch_size, "seed": config.seed}


def _symmetric(report: Report, task: Task) -> dict[str, Any]:
    """The symmetric model's entry: after fine-tuning, and before (calibrated if it was)."""
    acc = report["accuracy"]
    finetuned = report["kind"] == "finetuned"
    scores = acc.get("finetuned") if finetuned else acc.get("converted")
    # "before fine-tuning": what each compression alone costs, before any training
    before = acc.get("converted") if finetuned else None
    if before is not None and task.metric.key in (acc.get("calibrated") or {}):
        before = acc["calibrated"]  # the fine-tune started from the calibrated model
    flops, lat = report.get("flops") or {}, report.get("latency") or {}
    return {"label": f"symmetric ({report['scheme']})",
            "params_stored": report["params"]["after"],
            "params_nonzero": count_nonzero(load(report["directory"])),
            "bytes": report["bytes"]["symconvert"],
            "flops": flops.get("folded"), "latency_ms": lat.get("folded_ms"),
            "latency_source_ms": lat.get("source_ms"),
            "latency_vs_source": lat.get("folded_vs_source"),
            **task.scores(scores or {}), "before_finetune": task.scores(before or {})}


def compare(report: Report, task: Task, meta: dict[str, Any], sources: SourceCache,
            options: ReportOptions, device: torch.device, say: Log) -> dict[str, Any]:
    """The report's ``compare`` entry: the symmetric model and every baseline asked for."""
    if not sources.has_weights:
        raise SymconvertError(
            f"--compare needs the pretrained source: {report['model']} was converted with "
            "--no-pretrained, so there is no source model to prune or fine-tune.")
    config, train_data = recorded_config(meta, options, device)
    acc = report["accuracy"]
    out: dict[str, Any] = {"budget": _budget(config, train_data),
                           "removed": report["params"]["saved"], "n": acc.get("n"),
                           "task": task.name, "symmetric": _symmetric(report, task)}
    job = Job(out["removed"], task, acc, options, device, say, meta)
    for kind in options.compare:
        say(f"baseline {kind}: building the source")
        base = BASELINES[kind](task.same_data(sources.fresh(), meta), job)
        if base.model is not None:
            _finish(kind, base, config, train_data, sources, job)
        out[kind] = base.entry
    out["summary"] = compare_sentence(out, task)
    return out


def _finish(kind: str, base: Baseline, config: FinetuneConfig | None, train_data: str | None,
            sources: SourceCache, job: Job) -> None:
    """Fine-tune the baseline with the recorded budget, then score and measure it."""
    model, entry = base.model, base.entry
    if config is not None:
        job.say(f"baseline {kind}: fine-tuning {config.epochs} epoch(s) on {train_data}")
        teacher = sources.fresh() if config.distill else None
        with tempfile.TemporaryDirectory(prefix=f"symconvert-{kind}-") as tmp:
            result = fit(model, train_data, tmp, config, teacher=teacher,
                         progress=job.options.progress)
        entry["curve"] = result.metrics
    model = make_permanent(model).cpu().eval()
    job.say(f"baseline {kind}: evaluating")
    entry.update(job.task.scores(evaluate_on(model, job.options, job.device)))
    entry.update(params_stored=count_parameters(model), params_nonzero=count_nonzero(model),
                 bytes=dense_bytes(model))
    job.say(f"baseline {kind}: counting FLOPs and timing it against the source")
    entry.update(speed(model, job.task.same_data(sources.weighted(), job.meta), job))


__all__ = ["BASELINES", "Baseline", "compare", "recorded_config"]
