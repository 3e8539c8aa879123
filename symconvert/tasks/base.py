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
    task = task_of(model)                         # the task a model (directory) records
    (x,) = task.example_inputs(model, batch_size=8)  # what FLOPs, latency and export feed it
    task.metric.format(scores["perplexity"])      # "142.30"; top-1: "93.10 %"

A new task is one module that subclasses ``Task``, decorates it with ``@register_task`` and
is imported by ``symconvert/tasks/__init__.py`` (one line).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from symconvert.errors import DataError, SymconvertError
from symconvert.models.sources import model_string
from symconvert.tasks.data import TASKS, DataSpec, parse_data_spec, source_forms


@dataclass(frozen=True)
class Metric:
    """One score a task reports: its key in a scores dict, how it is named and shown, and
    which way is better."""

    key: str  # "top1", "perplexity"
    label: str  # "top-1", "perplexity"
    higher_is_better: bool = True
    #: a fraction in [0, 1] shown as a percentage (differences in points)
    percent: bool = False

    def format(self, value: float | None) -> str:
        if value is None:
            return "—"
        return f"{value * 100:.2f} %" if self.percent else f"{value:.2f}"

    def plotted(self, value: float) -> float:
        """The value on a plot's axis (percent: × 100)."""
        return value * 100 if self.percent else value

    @property
    def axis_label(self) -> str:
        return f"{self.label} (%)" if self.percent else self.label

    def better(self, a: float, b: float) -> bool:
        return a > b if self.higher_is_better else a < b


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
    #: The unit of ``seen`` in logs (img/s, tok/s) and its plural in words and JSON keys
    #: (``images_per_s``).
    unit: ClassVar[str] = "img"
    items: ClassVar[str] = "images"
    #: The scores the task reports, the first one summarising a model (``metric``).
    score_metrics: ClassVar[tuple[Metric, ...]] = ()
    #: What the report calls the scores ("accuracy", "perplexity").
    score_title: ClassVar[str] = "accuracy"
    #: The names of the model's inputs and outputs in an exported graph.
    input_names: ClassVar[tuple[str, ...]] = ("input",)
    output_names: ClassVar[tuple[str, ...]] = ("output",)
    #: Whether CPU autocast (bf16) can run the task's models; None when it can, else why not.
    cpu_amp_unsupported: ClassVar[str | None] = None
    #: What a model of the task is, in words ("an image classifier").
    model_kind: ClassVar[str] = "a model"
    #: Data sources of other tasks that a model of this task reads as its own (an ``hf:``
    #: causal LM reads ``text:`` with its tokenizer): ``task_for_data`` then picks this task.
    reads: ClassVar[tuple[str, ...]] = ()

    @property
    def metric(self) -> Metric:
        return self.score_metrics[0]

    @property
    def primary(self) -> str:
        """The key of ``metric`` (``top1``, ``perplexity``)."""
        return self.metric.key

    @property
    def higher_is_better(self) -> bool:
        return self.metric.higher_is_better

    @property
    def rate_key(self) -> str:
        """The ``metrics.jsonl`` key of the training throughput."""
        return f"{self.items}_per_s"

    def scores(self, result: dict[str, Any]) -> dict[str, Any]:
        """The reported scores of an evaluation result (no ``n``, ``split``, ``loss``)."""
        return {m.key: result[m.key] for m in self.score_metrics if m.key in result}

    def describe_n(self, n: int | None) -> str:
        """How many items a score was measured on, in words."""
        return "n = —" if n is None else f"n = {n:,}"

    # -- the model -------------------------------------------------------------------
    def claims(self, model: nn.Module, meta: dict[str, Any]) -> bool:
        """Whether ``model`` (with the metadata its directory has or will have) is of this
        task (``task_of`` asks every task, the registered default last)."""
        return False

    def refuses(self, model: nn.Module, meta: dict[str, Any] | None = None) -> Task | None:
        """The task ``model`` is of when it cannot take this task's data (None: it can):
        asked before any data is read. By default a model takes the data of its own task
        (``task_of``)."""
        own = task_of(model, meta)
        return None if own is self else own

    def check_data(self, model: nn.Module, data: str | DataSpec, flag: str = "--data",
                   meta: dict[str, Any] | None = None) -> None:
        """Raise a ``DataError`` naming both sides and the way out when ``model`` cannot
        take ``data`` (a spec of one of this task's sources); reads no data. ``flag`` is
        how the user gave the data (``--data``, ``--calibrate``, a recipe key)."""
        own = self.refuses(model, meta)
        if own is None:
            return
        source = getattr(model, "symconvert_source", None)
        name = model_string(source) if source else type(model).__name__
        raise DataError(
            f"{flag} {parse_data_spec(data).text} is {self.name} data ({self.items}), but the "
            f"model {name} is {own.model_kind}: it cannot read them. Give it {own.name} data "
            f"({source_forms(own.name)}), or use {self.model_kind} for this data.")

    def same_data(self, model: nn.Module, meta: dict[str, Any]) -> nn.Module:
        """``model`` made to read the data as the directory with metadata ``meta`` does (a
        sibling: the source, the converted parent); returns it."""
        return model

    def example_inputs(self, model: nn.Module, batch_size: int = 1,
                       input_size: Any = None) -> tuple[torch.Tensor, ...]:
        """Zero inputs of the shape the model takes (FLOPs, latency, export tracing);
        ``input_size`` (``--input-size``) overrides the size where the task has one."""
        raise NotImplementedError

    def dynamic_axes(self, model: nn.Module, example: tuple[torch.Tensor, ...]
                     ) -> tuple[list[str], dict[str, dict[int, str]]]:
        """``(output_names, dynamic_axes)`` of an exported graph (ONNX)."""
        names = list(self.output_names)
        return names, {n: {0: "batch"} for n in (*self.input_names, *names)}

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
        """A few words for log lines: ``eval top-1 93.10%`` or ``eval perplexity 142.30``."""
        raise NotImplementedError

    def describe_train(self, row: dict[str, Any]) -> str:
        """Training scores of a ``metrics.jsonl`` row for the epoch's log line ("" if none)."""
        return ""

    def describe_progress(self, totals: dict[str, Any], rate: float) -> str:
        """The progress bar's words for the running epoch (``totals``: loss_sum, correct,
        seen)."""
        return f"{rate:.0f} {self.unit}/s"


#: the task of a model no other task claims
DEFAULT_TASK = "classification"
#: the metadata key of a model directory that names its task
TASK_KEY = "task"


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make ``cls.name`` a task data sources can name."""
    TASKS[cls.name] = cls()
    return cls


def task_of(model: nn.Module, meta: dict[str, Any] | None = None) -> Task:
    """The task a model is judged by: the one ``meta`` (default: the model's directory
    metadata) records under ``task``, else the first registered task that claims it, else
    ``DEFAULT_TASK``."""
    if meta is None:
        meta = getattr(model, "symconvert_metadata", None) or {}
    if meta.get(TASK_KEY):
        return get_task(meta[TASK_KEY])
    for name, task in TASKS.items():
        if name != DEFAULT_TASK and task.claims(model, meta):
            return task
    return get_task(DEFAULT_TASK)



def task_for_scores(scores: dict[str, Any] | None) -> Task:
    """The task whose primary metric a scores dict holds (a report built elsewhere)."""
    for task in TASKS.values():
        if scores and task.metric.key in scores:
            return task
    return get_task(DEFAULT_TASK)


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise SymconvertError(f"no task {name!r} (known: {', '.join(sorted(TASKS))})") from None


def task_for_data(spec: Any, meta: dict[str, Any] | None = None) -> Task:
    """The task of a ``--data`` spec (or parsed ``DataSpec``, or built ``Loaders``); with
    ``meta`` (a model directory's metadata), the task it records when that task reads the
    spec's source (``Task.reads``: an ``hf:`` causal LM on ``text:``), so that its defaults
    apply and not the data's own task's."""
    task = getattr(spec, "task", None)
    if isinstance(task, str):  # Loaders
        return get_task(task)
    source = parse_data_spec(spec).source
    recorded = TASKS.get(str((meta or {}).get(TASK_KEY)))
    if recorded is not None and source.name in recorded.reads:
        return recorded
    return get_task(source.task)


def check_data(model: nn.Module, data: str | DataSpec, *, flag: str = "--data") -> Task:
    """The task of ``data`` (a ``--data`` spec), after it checked that ``model`` can take
    that data (``Task.check_data``: a ``DataError`` otherwise). Reads no data: every
    command (and ``run``, before it creates anything) asks this first."""
    task = task_for_data(data)
    task.check_data(model, data, flag)
    return task


def list_tasks() -> list[Task]:
    return [TASKS[k] for k in sorted(TASKS)]
