"""Metrics on the eval split: ``evaluate(model, "digits") -> {"top1", "top5", "n", "split"}``.

The data source's task measures: ``classification`` gives top-1/top-5, ``language-model``
(``text:ROOT``) ``{"perplexity", "loss", "tokens", "n", "split"}`` (``symconvert.tasks``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from symconvert.checks import resolve_device
from symconvert.errors import SymconvertError
from symconvert.io.loading import load
from symconvert.models.sources import create_model
from symconvert.tasks import get_task
from symconvert.tasks.data import DataSpec, Loaders, create_loaders


def evaluate_loaders(model: nn.Module, loaders: Loaders, device: torch.device | None = None,
                     autocast: contextlib.AbstractContextManager | None = None) -> dict[str, Any]:
    """Metrics of ``model`` on already-built loaders, as their task measures them;
    restores the model's train/eval mode."""
    return get_task(loaders.task).evaluate(model, loaders, device, autocast)


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
    get_task(loaders.task).check_model(model, loaders)
    model.to(dev)
    return evaluate_loaders(model, loaders, dev)


def load_model(spec: str | Path, *, pretrained: bool = True,
               weights: str | Path | None = None) -> nn.Module:
    """A converted/fine-tuned directory (``symconvert.load``) or a MODEL string
    (``symconvert.create_model``)."""
    path = Path(spec)
    if path.is_dir():
        return load(path)
    text = str(spec)
    if not path.exists() and ":" not in text and ("/" in text or text.startswith(".")):
        raise SymconvertError(
            f"{spec}: no such model directory. Pass a directory written by `symconvert "
            "convert` or `symconvert finetune`, or a MODEL string such as timm:resnet18.")
    if path.suffix in {".safetensors", ".pt", ".pth", ".bin"} and path.exists():
        raise SymconvertError(f"{spec} is a weights file; pass the MODEL it belongs to with "
                              f"--weights, or the converted directory that holds it")
    return create_model(str(spec), pretrained=pretrained,
                                   weights=str(weights) if weights else None)


__all__ = ["evaluate", "evaluate_loaders", "load_model", "resolve_device"]
