"""``Task``: what a kind of model is trained and judged by, registered like the schemes.

A task owns the parts of fine-tuning and evaluation that differ between, say, an image
classifier and a language model: the data sources it reads (``DataSource.task`` names the
task), the loss and its distillation form, the metrics, the default hyper-parameters and the
state a training step carries to the next one (an RNN's hidden state). The training loop
(``symconvert.train.loop``), ``evaluate``, ``report``, ``run`` and ``--compare`` ask the task;
nothing else looks at the data spec.

    task = task_for_data("text:data/ptb")         # the LanguageModelTask
    task.defaults                                 # {"lr": 20.0, "clip_grad": 0.25, ...}
    scores = task.evaluate(model, loaders, device)  # {"perplexity": ..., "split": "test", ...}
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from symconvert.errors import SymconvertError


@dataclass
class StepOutput:
    """One training step's loss and what the epoch statistics need from it."""

    loss: torch.Tensor
    seen: int  # images or predicted tokens
    correct: int = 0  # classification only


class Task:
    """Subclass, set ``name`` (the ``DataSource.task`` value) and register it."""

    name: ClassVar[str]
    #: FinetuneConfig fields the task sets when the caller leaves them unset (None).
    defaults: ClassVar[dict[str, Any]] = {}
    #: The unit of ``seen`` in logs: img/s, tok/s.
    unit: ClassVar[str] = "img"
    #: The metric a single number summarises a model by, and whether higher is better.
    primary: ClassVar[str] = "top1"
    higher_is_better: ClassVar[bool] = True
    #: Whether CPU autocast (bf16) can run the task's models; None when it can, else why not.
    cpu_amp_unsupported: ClassVar[str | None] = None

    # -- training ------------------------------------------------------------------
    def start_epoch(self) -> Any:
        """The carried state at the start of an epoch (None: nothing carried)."""
        return None

    def step(self, model: nn.Module, teacher: nn.Module | None, batch: Any,
             device: torch.device, config: Any, carry: Any) -> tuple[StepOutput, Any]:
        """Forward + loss of one batch; returns the output and the state to carry on."""
        raise NotImplementedError

    def distillation_loss(self, student: torch.Tensor, teacher: torch.Tensor,
                          temperature: float) -> torch.Tensor:
        """Hinton's KL(teacher_T ‖ student_T) · T² over the last (class/vocabulary) axis."""
        t = temperature
        s = student.reshape(-1, student.size(-1)).float()
        q = teacher.reshape(-1, teacher.size(-1)).float()
        return F.kl_div(F.log_softmax(s / t, dim=1), F.log_softmax(q / t, dim=1),
                        reduction="batchmean", log_target=True) * (t * t)

    def mixed_loss(self, logits: torch.Tensor, targets: torch.Tensor,
                   soft: torch.Tensor | None, config: Any) -> torch.Tensor:
        """Cross-entropy, blended with the distillation term when a teacher spoke."""
        ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))
        if soft is None:
            return ce
        kd = self.distillation_loss(logits, soft, config.distill_temperature)
        return config.distill_alpha * kd + (1 - config.distill_alpha) * ce

    # -- evaluation ----------------------------------------------------------------
    def metrics(self, model: nn.Module, loaders: Any, device: torch.device,
                autocast: contextlib.AbstractContextManager | None = None) -> dict[str, Any]:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, loaders: Any, device: torch.device | None = None,
                 autocast: contextlib.AbstractContextManager | None = None) -> dict[str, Any]:
        """Metrics on ``loaders.eval``; eval mode, the model's train/eval mode restored."""
        if device is None:
            param = next(model.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
        was_training = model.training
        model.eval()
        try:
            return self.metrics(model, loaders, device, autocast)
        finally:
            model.train(was_training)

    def check_model(self, model: nn.Module, loaders: Any) -> None:
        """Raise a DataError when ``model`` cannot consume ``loaders`` (head / vocabulary)."""

    # -- reporting -----------------------------------------------------------------
    def epoch_row(self, totals: dict[str, Any], scores: dict[str, Any]) -> dict[str, Any]:
        """The task's columns of a ``metrics.jsonl`` row."""
        raise NotImplementedError

    def describe_scores(self, scores: dict[str, Any]) -> str:
        """A few words for log lines: ``top-1 93.1%`` or ``perplexity 142.3``."""
        raise NotImplementedError


TASKS: dict[str, Task] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make ``cls.name`` a task data sources can name."""
    TASKS[cls.name] = cls()
    return cls


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise SymconvertError(f"no task {name!r} (known: {', '.join(sorted(TASKS))})") from None


def task_for_data(spec: Any) -> Task:
    """The task of a ``--data`` spec (or parsed ``DataSpec``, or built ``Loaders``)."""
    task = getattr(spec, "task", None)
    if isinstance(task, str):  # Loaders
        return get_task(task)
    from symconvert.tasks.data import parse_data_spec

    return get_task(parse_data_spec(spec).source.task)


def list_tasks() -> list[Task]:
    return [TASKS[k] for k in sorted(TASKS)]
