"""Accuracy on the eval split: ``evaluate(model, "digits") -> {"top1", "top5", "n", "split"}``.

Metrics are chosen by the data source's ``task``: ``classification`` gives top-1/top-5.
A language-model source registers its own metric (perplexity) with
``@register_evaluator("language-model")`` and returns e.g. ``{"perplexity": f, "n": tokens}``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from symconvert.data import DataSpec, Loaders, check_num_classes, create_loaders
from symconvert.errors import SymconvertError

#: task → function(model, loaders, device, autocast) -> metrics dict
EVALUATORS: dict[str, Callable[..., dict[str, Any]]] = {}


def register_evaluator(task: str) -> Callable:
    """Decorator: the metric function for data sources whose ``task`` is ``task``."""

    def wrap(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        EVALUATORS[task] = fn
        return fn

    return wrap


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; anything else as torch spells it."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise SymconvertError(f"--device {device!r}: not a device torch knows "
                              "(use auto, cpu, cuda or cuda:N)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SymconvertError(f"--device {device}: CUDA is not available here; use --device cpu")
    return dev


@register_evaluator("classification")
@torch.no_grad()
def classification_metrics(model: nn.Module, loaders: Loaders, device: torch.device,
                           autocast: contextlib.AbstractContextManager | None = None
                           ) -> dict[str, Any]:
    """Top-1 (and top-5 when there are ≥ 5 classes) over ``loaders.eval``.

    Under DDP each rank sees a disjoint shard; the counts are summed across ranks.
    """
    channels_last = device.type == "cuda"
    correct1 = torch.zeros((), dtype=torch.float64, device=device)
    correct5 = torch.zeros((), dtype=torch.float64, device=device)
    seen = torch.zeros((), dtype=torch.float64, device=device)
    k = min(5, loaders.num_classes)
    for images, targets in loaders.eval:
        images = images.to(device, non_blocking=True)
        if channels_last and images.ndim == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = targets.to(device, non_blocking=True)
        with autocast or contextlib.nullcontext():
            logits = model(images)
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        top = logits.float().topk(k, dim=1).indices
        hits = top.eq(targets.unsqueeze(1))
        correct1 += hits[:, 0].sum()
        correct5 += hits.any(dim=1).sum()
        seen += targets.numel()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        counts = torch.stack([correct1, correct5, seen])
        torch.distributed.all_reduce(counts)
        correct1, correct5, seen = counts
    n = int(seen.item())
    result: dict[str, Any] = {"top1": float(correct1.item()) / max(n, 1)}
    if loaders.num_classes >= 5:
        result["top5"] = float(correct5.item()) / max(n, 1)
    result["n"] = n
    result["split"] = loaders.eval_split
    return result


def evaluate_loaders(model: nn.Module, loaders: Loaders, device: torch.device | None = None,
                     autocast: contextlib.AbstractContextManager | None = None) -> dict[str, Any]:
    """Metrics of ``model`` on already-built loaders; restores the model's train/eval mode."""
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    try:
        metric = EVALUATORS[loaders.task]
    except KeyError as exc:
        raise SymconvertError(f"no evaluator for task {loaders.task!r} "
                              f"(known: {', '.join(sorted(EVALUATORS))})") from exc
    was_training = model.training
    model.eval()
    try:
        return metric(model, loaders, device, autocast)
    finally:
        model.train(was_training)


def evaluate(model: nn.Module, data: str | DataSpec, *, batch_size: int = 256,
             device: str | torch.device | None = "auto", input_size: Any = None,
             subsample: int | None = None, workers: int = 0,
             download: bool = False) -> dict[str, Any]:
    """``{"top1": f, "top5": f, "n": int, "split": "test"}`` of ``model`` on ``data``'s eval split.

    Deterministic (no augmentation, fixed order, fixed subsample), ``no_grad``, eval mode, fp32.
    """
    dev = resolve_device(device)
    loaders = create_loaders(data, model, batch_size=batch_size, eval_batch_size=batch_size,
                             workers=workers, input_size=input_size, subsample=subsample,
                             download=download, train=False)
    if loaders.task == "classification":
        check_num_classes(model, loaders)
    model.to(dev)
    return evaluate_loaders(model, loaders, dev)


def load_model(spec: str | Path, *, pretrained: bool = True,
               weights: str | Path | None = None) -> nn.Module:
    """A converted/fine-tuned directory (``symconvert.load``) or a MODEL string
    (``symconvert.create_model``)."""
    import symconvert

    path = Path(spec)
    if path.is_dir():
        return symconvert.load(path)
    text = str(spec)
    if not path.exists() and ":" not in text and ("/" in text or text.startswith(".")):
        raise SymconvertError(
            f"{spec}: no such model directory. Pass a directory written by `symconvert "
            "convert` or `symconvert finetune`, or a MODEL string such as timm:resnet18.")
    if path.suffix in {".safetensors", ".pt", ".pth", ".bin"} and path.exists():
        raise SymconvertError(f"{spec} is a weights file; pass the MODEL it belongs to with "
                              f"--weights, or the converted directory that holds it")
    return symconvert.create_model(str(spec), pretrained=pretrained,
                                   weights=str(weights) if weights else None)


__all__ = ["EVALUATORS", "classification_metrics", "evaluate", "evaluate_loaders", "load_model",
           "register_evaluator", "resolve_device"]
