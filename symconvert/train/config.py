"""Fine-tuning settings: ``FinetuneConfig`` (every trainer option, defined once: the
``symconvert finetune`` flags and the recipe's ``finetune`` keys are generated from it),
``task_config`` (a data task's defaults filled in) and ``plain`` (a JSON-able copy for
checkpoints and metadata)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from symconvert.checks import parse_input_size
from symconvert.errors import SymconvertError
from symconvert.io.dtypes import DTYPE_NAMES, dtype_name, parse_dtype
from symconvert.io.loading import read_metadata
from symconvert.options import Options, option, option_fields
from symconvert.tasks import Task, task_for_data
from symconvert.tasks.data import DataSpec, Loaders

#: data options: in a recipe they are keys of the ``data`` section (the report reads them too)
DATA_FIELDS = ("input_size", "subsample", "augment", "download")


@dataclass
class FinetuneConfig(Options):
    """Training options. Defaults recover a converted model (short, distilled, warmed up, no
    augmentation); they are not a recipe for training from scratch. The image defaults
    (SGD lr 0.02, a linear warm-up over a tenth of an epoch but at least 20 steps, cosine)
    were chosen on the pretrained Fashion-MNIST test models (README, "Fine-tuning a
    converted model"). A field left None takes the task's default (``task_config``); "hf:"
    marks an hf: model's, on text: as on tsv: (``data_task``)."""

    epochs: int = option(2, "Epochs of fine-tuning.", ge=1)
    lr: float | None = option(None, "Peak learning rate.", gt=0.0,
                              shown_default="0.02 for sgd, 3e-4 for adamw; text: 20; hf: 1e-4")
    batch_size: int = option(64, "Batch size per process (torchrun: × processes).", ge=1,
                             short="-b", shown_default="64, text: 20 streams, hf: 16")
    opt: str = option("sgd", "Optimiser: sgd (Nesterov momentum, timm's default) or adamw.",
                      choices=("sgd", "adamw"), shown_default="sgd, hf: adamw")
    momentum: float = option(0.9, "SGD momentum.", ge=0.0, lt=1.0, shown_default="0.9, text: 0")
    sched: str = option("cosine", "lr schedule: cosine, step (× --decay-rate every third of "
                        "the run), multistep (at --decay-milestones) or none.",
                        choices=("cosine", "step", "multistep", "none"))
    decay_milestones: tuple[int, ...] | None = option(
        None, "For --sched multistep: epochs at which the lr is multiplied by --decay-rate, "
        "e.g. 60,120,160.", text_type=str)
    decay_rate: float = option(0.1, "lr factor at each step/multistep decay.", gt=0.0)
    weight_decay: float = option(5e-5, "Weight decay (never on norms and biases).", ge=0.0,
                                 shown_default="5e-5, text: 0")
    warmup_epochs: float | None = option(
        None, "Linear warm-up, in epochs (fractions allowed).", ge=0.0,
        shown_default="a tenth of an epoch but at least 20 steps, at most half the run; text: 0")
    min_lr: float = option(0.0, "Final learning rate of the schedule.", ge=0.0)
    clip_grad: float | None = option(5.0, "Clip the global gradient norm (0 disables).",
                                     ge=0.0, shown_default="5.0, text: the paper's 0.25, hf: 1.0")
    amp: bool | None = option(None, "Mixed precision.",
                              shown_default="on for CUDA, off for CPU")
    amp_dtype: str | None = option(None, "AMP dtype: bfloat16 or float16.",
                                   choices=("bfloat16", "float16"),
                                   shown_default="bfloat16 on CPU, bf16/fp16 on CUDA")
    device: str = option("auto", "auto (CUDA when available), cpu, cuda, cuda:N.")
    workers: int = option(0, "Data-loading worker processes.", ge=0)
    seed: int = option(0, "Seed for shuffling, augmentation and new heads.", ge=0)
    distill: bool = option(True, "Distil from the unconverted source model.")
    distill_alpha: float = option(0.7, "Weight of the distillation (KL) term; 1-alpha on "
                                  "cross-entropy.", ge=0.0, le=1.0)
    distill_temperature: float = option(2.0, "Softmax temperature of the distillation term.",
                                        gt=0.0)
    distill_features: float = option(0.0, "Weight of block-output distillation: the "
                                     "student's residual blocks / transformer layers pulled "
                                     "towards the teacher's outputs (relative MSE), beside the "
                                     "logit term (0: off).", ge=0.0)
    checkpoint_every: int = option(0, "Also checkpoint every N optimiser steps (0: every "
                                   "epoch only).", ge=0)
    log_interval: int = option(0, "When stderr is not a terminal (nohup, SLURM, CI): a plain "
                               "progress line every N steps (0: every ~30 s).", ge=0)
    bptt: int = option(35, "text: tokens per truncated-BPTT segment.", ge=1)
    input_size: str | None = option(None, "Input size H or H,W.", text_type=str,
                                    check=parse_input_size,
                                    shown_default="the model's pretrained config")
    subsample: int | None = option(None, "At most N items per split (stratified, "
                                   "deterministic; text: N tokens); for quick checks.", ge=1)
    augment: bool | None = option(None, "Train-time crop/flip (off by default: it costs "
                                  "accuracy in a short distilled recovery).",
                                  shown_default="the data source's default")
    download: bool = option(False, "Download mnist/cifar data into ROOT if missing.")
    dtype: str = option("float32", "Storage precision of the written model directory: "
                        "float32, bfloat16 or float16 (training stays float32).",
                        choices=DTYPE_NAMES)

    #: options a resumed run may change (they do not change the trajectory)
    RESUMABLE: ClassVar[tuple[str, ...]] = ("device", "workers", "checkpoint_every",
                                            "log_interval", "download", "dtype")

    def __post_init__(self) -> None:
        self.opt = str(self.opt).lower()
        self.sched = str(self.sched).lower()
        self.dtype = dtype_name(parse_dtype(self.dtype))
        self.decay_milestones = _milestones(self.decay_milestones)
        if self.input_size is not None and not isinstance(self.input_size, str):
            self.input_size = ",".join(str(int(v)) for v in np.atleast_1d(self.input_size))
        super().__post_init__()  # bounds and choices of every option
        if self.sched == "multistep" and not self.decay_milestones:
            raise SymconvertError("--sched multistep needs --decay-milestones, e.g. 60,120,160")
        if self.lr is None:
            self.lr = 0.02 if self.opt == "sgd" else 3e-4

    @classmethod
    def trajectory(cls) -> list[str]:
        """The options that change the trajectory: a resume with other values would not
        continue the run."""
        return [name for name in cls.names() if name not in cls.RESUMABLE]


def _milestones(value: Any) -> tuple[int, ...] | None:
    """``"60,120,160"`` or a list → ``(60, 120, 160)``."""
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        epochs = tuple(int(str(v).strip()) for v in parts if str(v).strip())
    except ValueError:
        epochs = (-1,)
    if any(e < 0 for e in epochs):
        raise SymconvertError(f"--decay-milestones {value!r}: expected epochs such as "
                              "60,120,160 (whole numbers >= 0)")
    return epochs


def nullable(name: str) -> bool:
    """Whether None is a value of its own for the option (not "the default")."""
    field = next(f for f, _ in option_fields(FinetuneConfig) if f.name == name)
    return "None" in str(field.type)


def task_config(data: str | DataSpec | Loaders | Task, config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with the data's task defaults for the fields left out or None
    (lr 20 and clip 0.25 for a language model, clip 5.0 for images, ...)."""
    filled = dict(config)
    task = data if isinstance(data, Task) else task_for_data(data)
    for key, value in task.defaults.items():
        if filled.get(key) is None and value is not None:
            filled[key] = value
    known = set(FinetuneConfig.names())
    return {k: v for k, v in filled.items()
            if v is not None or (k in known and nullable(k)) or k not in known}


def data_task(data: str | DataSpec | Loaders, model_dir: str | os.PathLike | None = None
              ) -> Task:
    """The task whose defaults fine-tune the model in ``model_dir`` on ``data``: the task
    the directory records when it reads that data (an ``hf:`` causal LM on ``text:`` takes
    AdamW, not the LSTM language model's SGD lr 20), else the data's. Only the metadata is
    read; an unreadable directory gives the data's task (loading it then says what is
    wrong)."""
    meta: dict[str, Any] = {}
    if model_dir is not None:
        try:
            meta = read_metadata(model_dir)
        except SymconvertError:
            meta = {}
    return task_for_data(data, meta)


def finetune_config(data: str | DataSpec | Loaders | Task, **settings: Any) -> FinetuneConfig:
    """The ``FinetuneConfig`` of ``settings`` (options by name; None or absent: the data
    task's default, then the config's). An unknown name is a ``SymconvertError``."""
    unknown = sorted(set(settings) - set(FinetuneConfig.names()))
    if unknown:
        raise SymconvertError(f"unknown fine-tuning option {unknown[0]!r} (known: "
                              f"{', '.join(FinetuneConfig.names())})")
    return FinetuneConfig(**task_config(data, settings))


def plain(value: Any) -> Any:
    """JSON-able copy (dataclasses → dicts, tuples → lists, paths → str) for checkpoints
    and metadata."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


__all__ = ["DATA_FIELDS", "FinetuneConfig", "data_task", "finetune_config", "nullable", "plain",
           "task_config"]
