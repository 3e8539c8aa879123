"""Fine-tuning settings: ``FinetuneConfig`` (the trainer's flags), ``task_config`` (a data
task's defaults filled in) and ``_plain`` (a JSON-able copy for checkpoints and metadata)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from symconvert.errors import SymconvertError
from symconvert.tasks import Task, task_for_data
from symconvert.tasks.data import DataSpec, Loaders


@dataclass
class FinetuneConfig:
    """Training flags. Defaults recover a converted model (short, distilled, warmed up, no
    augmentation); they are not a recipe for training from scratch. The image defaults
    (SGD lr 0.02, a linear warm-up over a tenth of an epoch but at least 20 steps, cosine)
    were chosen on
    the pretrained Fashion-MNIST test models (README, "Fine-tuning a converted model")."""

    epochs: int = 2
    lr: float | None = None  # None: 0.02 for sgd, 3e-4 for adamw
    batch_size: int = 64  # per process (torchrun: global batch = batch_size × processes)
    opt: str = "sgd"
    momentum: float = 0.9
    sched: str = "cosine"
    decay_milestones: tuple[int, ...] | None = None  # multistep: epochs at which lr *= decay_rate
    decay_rate: float = 0.1
    weight_decay: float = 5e-5
    # None: a tenth of an epoch but at least 20 optimiser steps (at most half the run);
    # language models: 0
    warmup_epochs: float | None = None
    min_lr: float = 0.0
    clip_grad: float | None = 5.0  # max global gradient norm; None/0 disables
    amp: bool | None = None  # None: on for CUDA, off for CPU
    amp_dtype: str | None = None  # bfloat16 | float16; None: bf16 on CPU, bf16/fp16 on CUDA
    device: str = "auto"
    workers: int = 0
    seed: int = 0
    distill: bool = True
    distill_alpha: float = 0.7  # weight of the KL term; 1 - alpha on cross-entropy
    distill_temperature: float = 2.0
    checkpoint_every: int = 0  # also checkpoint every N optimiser steps (0: epochs only)
    log_interval: int = 0  # plain log line every N steps when stderr is no terminal (0: ~30 s)
    bptt: int = 35  # language models: tokens per truncated-BPTT segment
    input_size: str | None = None
    subsample: int | None = None
    augment: bool | None = None  # None: the data source's default
    download: bool = False

    def __post_init__(self) -> None:
        self.opt = self.opt.lower()
        self.sched = self.sched.lower()
        if self.opt not in ("sgd", "adamw"):
            raise SymconvertError(f"--opt {self.opt!r}: choose sgd or adamw")
        if self.sched not in ("cosine", "step", "multistep", "none"):
            raise SymconvertError(f"--sched {self.sched!r}: choose cosine, step, multistep or none")
        if isinstance(self.decay_milestones, str):
            self.decay_milestones = tuple(int(v) for v in self.decay_milestones.split(",") if v.strip())
        if self.decay_milestones is not None:
            self.decay_milestones = tuple(int(v) for v in self.decay_milestones)
        if self.sched == "multistep" and not self.decay_milestones:
            raise SymconvertError("--sched multistep needs --decay-milestones, e.g. 60,120,160")
        if self.epochs < 1:
            raise SymconvertError(f"--epochs {self.epochs}: need at least 1")
        if self.batch_size < 1:
            raise SymconvertError(f"--batch-size {self.batch_size}: need at least 1")
        if self.lr is None:
            self.lr = 0.02 if self.opt == "sgd" else 3e-4
        if not self.lr > 0:
            raise SymconvertError(f"--lr {self.lr}: must be positive")
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise SymconvertError(f"--distill-alpha {self.distill_alpha}: must be in [0, 1]")
        if not self.distill_temperature > 0:
            raise SymconvertError(
                f"--distill-temperature {self.distill_temperature}: must be positive")
        if self.amp_dtype not in (None, "bfloat16", "float16"):
            raise SymconvertError(f"amp dtype {self.amp_dtype!r}: choose bfloat16 or float16")
        if self.input_size is not None and not isinstance(self.input_size, str):
            self.input_size = ",".join(str(int(v)) for v in np.atleast_1d(self.input_size))

    # Flags that change the trajectory: a resume with other values would not continue the run.
    TRAJECTORY = ("epochs", "lr", "batch_size", "opt", "momentum", "sched", "decay_milestones",
                  "decay_rate", "weight_decay",
                  "warmup_epochs", "min_lr", "clip_grad", "amp", "amp_dtype", "seed", "distill",
                  "distill_alpha", "distill_temperature", "input_size", "subsample", "augment",
                  "bptt")


def task_config(data: str | DataSpec | Loaders | Task, config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with the data's task defaults for the fields left out or None
    (lr 20 and clip 0.25 for a language model, clip 5.0 for images, ...)."""
    filled = dict(config)
    task = data if isinstance(data, Task) else task_for_data(data)
    for key, value in task.defaults.items():
        if filled.get(key) is None and value is not None:
            filled[key] = value
    return {k: v for k, v in filled.items() if v is not None or k in _NULLABLE}


# Fields where None is a value of its own (not "the default").
_NULLABLE = {"lr", "amp", "amp_dtype", "input_size", "subsample", "augment", "decay_milestones",
             "clip_grad"}


def _plain(value: Any) -> Any:
    """JSON-able copy (tuples → lists, paths → str) for checkpoints and metadata."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value

