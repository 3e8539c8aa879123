"""Image classification: cross-entropy (+ KL distillation), top-1/top-5."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from symconvert.tasks.base import Metric, StepOutput, Task, register_task
from symconvert.tasks.data import check_num_classes, parse_input_size, resolve_image_config


@register_task
class ClassificationTask(Task):
    name = "classification"
    # lr None: 0.02 sgd / 3e-4 adamw; warmup_epochs None: the trainer's automatic warm-up
    defaults = {"lr": None, "clip_grad": 5.0, "batch_size": 64}
    unit = "img"
    items = "images"
    score_metrics = (Metric("top1", "top-1", percent=True), Metric("top5", "top-5", percent=True))
    score_title = "accuracy"
    model_kind = "an image classifier"

    def claims(self, model: nn.Module, meta: dict[str, Any]) -> bool:
        return True  # the default task

    def example_inputs(self, model: nn.Module, batch_size: int = 1,
                       input_size: Any = None) -> tuple[torch.Tensor, ...]:
        """A zero image batch as the model's config expects (timm's pretrained config, the
        channels its first conv really takes), ``input_size`` (H or H,W) applied."""
        cfg = resolve_image_config(model, parse_input_size(input_size))
        return (torch.zeros(batch_size, cfg.in_chans, *cfg.size),)

    def step(self, model: nn.Module, teacher: nn.Module | None, batch: Any,
             device: torch.device, config: Any, carry: Any) -> tuple[StepOutput, Any]:
        images, targets = batch
        images = images.to(device, non_blocking=True)
        if device.type == "cuda" and images.ndim == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = targets.to(device, non_blocking=True)
        logits = model(images)
        soft = None
        if teacher is not None:
            with torch.no_grad():
                soft = teacher(images)
        loss = self.mixed_loss(logits, targets, soft, config)
        correct = int((logits.detach().argmax(1) == targets).sum())
        return StepOutput(loss=loss, seen=targets.numel(), correct=correct), None

    def check_model(self, model: nn.Module, loaders: Any) -> None:
        check_num_classes(model, loaders)

    @torch.no_grad()
    def metrics(self, model: nn.Module, loaders: Any, device: torch.device,
                autocast: contextlib.AbstractContextManager | None = None) -> dict[str, Any]:
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
            hits = logits.float().topk(k, dim=1).indices.eq(targets.unsqueeze(1))
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

    def epoch_row(self, totals: dict[str, Any], scores: dict[str, Any]) -> dict[str, Any]:
        seen = max(totals["seen"], 1)
        return {"train_loss": totals["loss_sum"] / seen, "train_top1": totals["correct"] / seen,
                "eval_top1": scores.get("top1"), "eval_top5": scores.get("top5"),
                "eval_n": scores.get("n"), "split": scores.get("split")}

    def describe_scores(self, scores: dict[str, Any]) -> str:
        return f"eval top-1 {scores.get('top1', 0):.2%}"

    def describe_train(self, row: dict[str, Any]) -> str:
        return f"train top-1 {row['train_top1']:.2%}  "

    def describe_progress(self, totals: dict[str, Any], rate: float) -> str:
        return f"acc {totals['correct'] / max(totals['seen'], 1):.2%}  {rate:.0f} img/s"
