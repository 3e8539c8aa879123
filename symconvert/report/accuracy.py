"""The report's scores (accuracy, or whatever the model's task measures) of the source, the
converted, the calibrated and the fine-tuned model on one eval split."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from symconvert.errors import SymconvertError
from symconvert.io.files import WEIGHTS_NAME
from symconvert.io.loading import load, read_metadata
from symconvert.report.options import ReportOptions
from symconvert.report.sources import SourceCache
from symconvert.surgery.calib_costs import naive_from
from symconvert.tasks import Task
from symconvert.train.evaluate import evaluate

Log = Callable[[str], None]


def evaluate_on(model: nn.Module, options: ReportOptions, device: torch.device) -> dict[str, Any]:
    """The model's scores on ``options.data`` (then moved back to the CPU)."""
    result = evaluate(model, options.data, batch_size=options.batch_size, device=device,
                      input_size=options.input_size, subsample=options.subsample,
                      workers=options.workers)
    model.to("cpu")
    return result


def accuracy(model: nn.Module, task: Task, directory: Path, meta: dict[str, Any],
             parent: Path | None, kind: str, sources: SourceCache, options: ReportOptions,
             device: torch.device, say: Log) -> dict[str, Any]:
    """``{"source", "converted", "calibrated", "finetuned", "split", "n"}``: each the
    task's scores, or ``{"reason"}`` when it could not be measured."""
    if not options.data:
        labels = "/".join(m.label for m in task.score_metrics)
        return {"reason": "no --data given: pass --data SPEC (e.g. --data digits) to measure "
                          f"{labels} of the source, converted and fine-tuned models"}
    acc: dict[str, Any] = {}
    # The model in DIR first: a data error there is the user's to fix (exit 2), not a reason.
    say(f"evaluating {kind} model on {options.data}")
    own = evaluate_on(model, options, device)
    acc["split"], acc["n"] = own.get("split"), own.get("n")

    say("evaluating the source model")
    try:
        acc["source"] = task.scores(evaluate_on(task.same_data(sources.weighted(), meta), options,
                                                device))
    except SymconvertError as exc:
        acc["source"] = {"reason": str(exc)}
    if kind == "converted":
        acc["converted"] = task.scores(own)
        acc["finetuned"] = {"reason": f"{directory} has not been fine-tuned: run "
                                      f"`symconvert finetune {directory} --data SPEC`"}
    else:
        acc["converted"] = _parent_scores(task, parent, meta, options, device, say)
        acc["finetuned"] = task.scores(own)
    _calibrated(acc, task, model, directory, meta, parent, kind, sources, options, device, say)
    return {k: acc[k] for k in ("source", "converted", "calibrated", "finetuned", "split", "n")}


def _parent_scores(task: Task, parent: Path | None, meta: dict[str, Any],
                   options: ReportOptions, device: torch.device, say: Log) -> dict[str, Any]:
    """The converted model before fine-tuning: the fine-tuned directory's parent."""
    if parent is None:
        return {"reason": "the metadata records no parent (converted) directory"}
    if not (parent / WEIGHTS_NAME).is_file():
        return {"reason": f"the converted parent directory {parent} is gone"}
    say(f"evaluating the converted model before fine-tuning ({parent})")
    try:
        return task.scores(evaluate_on(task.same_data(load(parent), meta), options, device))
    except SymconvertError as exc:
        return {"reason": str(exc)}


def _calibrated(acc: dict[str, Any], task: Task, model: nn.Module, directory: Path,
                meta: dict[str, Any], parent: Path | None, kind: str, sources: SourceCache,
                options: ReportOptions, device: torch.device, say: Log) -> None:
    """With calibration (``convert --calibrate``) the row "converted" is the naive
    conversion (nearest symmetric weights, rebuilt from the source) and "calibrated" the
    calibrated directory before any fine-tuning."""
    cal_dir = directory if kind == "converted" else parent
    try:
        cal_meta = meta if kind == "converted" else (
            read_metadata(parent) if parent is not None else {})
    except SymconvertError:
        cal_meta = {}
    if not cal_meta.get("calibration"):
        acc["calibrated"] = {"reason": "not calibrated (convert --calibrate DATA)"}
        return
    acc["calibrated"] = acc["converted"]
    say("evaluating the naive conversion (nearest symmetric weights of the source)")
    try:
        base = model if kind == "converted" else load(cal_dir)
        acc["converted"] = task.scores(evaluate_on(naive_from(base, sources.weighted()),
                                                   options, device))
    except SymconvertError as exc:
        acc["converted"] = {"reason": str(exc)}


__all__ = ["Log", "accuracy", "evaluate_on"]
