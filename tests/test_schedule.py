"""SPEC section 6 schedules: the paper's CIFAR multistep schedule through timm's factory."""

from __future__ import annotations

import pytest
import torch

from symconvert.errors import SymconvertError
from symconvert.train.config import FinetuneConfig
from symconvert.train.optim import create_scheduler


def _lr_at(config: FinetuneConfig, epochs: list[int], steps_per_epoch: int = 10) -> list[float]:
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr)
    sched = create_scheduler(opt, config, steps_per_epoch)
    out = []
    for epoch in epochs:
        sched.step_update(epoch * steps_per_epoch)
        out.append(opt.param_groups[0]["lr"])
    return out


def test_multistep_is_the_papers_cifar_schedule():
    config = FinetuneConfig(epochs=200, lr=0.1, sched="multistep",
                            decay_milestones="60,120,160", decay_rate=0.2, warmup_epochs=0)
    lrs = _lr_at(config, [0, 59, 60, 119, 120, 159, 160, 199])
    assert lrs == pytest.approx([0.1, 0.1, 0.02, 0.02, 0.004, 0.004, 0.0008, 0.0008])


def test_multistep_without_milestones_is_refused():
    with pytest.raises(SymconvertError, match="decay-milestones"):
        FinetuneConfig(sched="multistep")
