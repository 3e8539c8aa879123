"""Optimiser and schedule for fine-tuning: weight decay on weights only (``param_groups``),
timm's optimiser and scheduler factories, and the distillation loss."""

from __future__ import annotations

import math
from typing import Any

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn

from symconvert.tasks import get_task
from symconvert.train.config import FinetuneConfig

# --------------------------------------------------------------- optimiser, schedule


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm,
                               nn.LocalResponseNorm)) or "Norm" in type(module).__name__


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weights only: not on norm layers, biases, or timm's no_weight_decay().

    Decided by owning module and name, not by ``ndim`` (timm's filter), because a converted
    layer's packed weight may well be 1-D and must still be decayed.
    """
    skip = set()
    no_wd = getattr(model, "no_weight_decay", None)
    if callable(no_wd):
        skip = set(no_wd())
    decay, no_decay, seen = [], [], set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full = f"{module_name}.{name}" if module_name else name
            packed = ".parametrizations." in f".{full}" and name == "original"
            if (full in skip or _is_norm(module) or name.endswith("bias")
                    or (param.ndim <= 1 and not packed)):
                no_decay.append(param)
            else:
                decay.append(param)
    return [{"params": no_decay, "weight_decay": 0.0},
            {"params": decay, "weight_decay": weight_decay}]


def create_optimizer(model: nn.Module, config: FinetuneConfig) -> torch.optim.Optimizer:
    kwargs: dict[str, Any] = {}
    if config.opt == "sgd" and not config.momentum:  # plain SGD (the paper's LM); timm's is Nesterov
        return torch.optim.SGD(param_groups(model, config.weight_decay), lr=config.lr,
                               weight_decay=config.weight_decay)
    if config.opt == "sgd":
        kwargs["momentum"] = config.momentum
    return create_optimizer_v2(param_groups(model, config.weight_decay), opt=config.opt,
                               lr=config.lr, weight_decay=config.weight_decay, **kwargs)


WARMUP_MIN_STEPS = 20


def auto_warmup_epochs(epochs: int, steps_per_epoch: int) -> float:
    """The default warm-up: a tenth of an epoch, but at least ``WARMUP_MIN_STEPS`` optimiser
    steps (momentum builds up over ~10 steps; on a calibrated start a shorter warm-up lets
    the first full-size steps knock accuracy back), and at most half the run."""
    return min(max(0.1, WARMUP_MIN_STEPS / max(1, steps_per_epoch)), 0.5 * epochs)


def create_scheduler(optimizer: torch.optim.Optimizer, config: FinetuneConfig,
                     steps_per_epoch: int) -> Any:
    """timm scheduler stepped per optimiser update (short runs need intra-epoch decay)."""
    sched = {"none": "constant"}.get(config.sched, config.sched)
    warmup = config.warmup_epochs
    if warmup is None:
        warmup = auto_warmup_epochs(config.epochs, steps_per_epoch)
    milestones = {"decay_milestones": list(config.decay_milestones)} if config.decay_milestones else {}
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=sched, num_epochs=config.epochs,
        decay_epochs=max(1, math.ceil(config.epochs / 3)), decay_rate=config.decay_rate,
        **milestones,
        warmup_epochs=warmup, warmup_lr=config.lr * 0.01,  # type: ignore[arg-type]
        min_lr=config.min_lr, step_on_epochs=False, updates_per_epoch=steps_per_epoch,
    )
    return scheduler


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """Hinton's KL(teacher_T ‖ student_T) · T², on temperature-softened logits (the tasks'
    shared form: ``Task.distillation_loss``)."""
    return get_task("classification").distillation_loss(student, teacher, temperature)
