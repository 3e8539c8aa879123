"""Fine-tuning that recovers a converted model's accuracy (SPEC §6).

``finetune(DIR, data)`` loads a converted directory, rebuilds the unconverted source as the
distillation teacher, trains with ``fit`` and writes ``DIR/finetuned`` (a model directory
again, plus ``metrics.jsonl`` and the resumable ``checkpoint.pt``).

``fit(model, data, out, config)`` is the loop itself, for any ``nn.Module``:
timm's optimiser and scheduler factories, AMP, gradient clipping, distillation, DDP under
``torchrun``, atomic checkpoints every epoch / every N steps / on SIGINT and SIGTERM, and exact
resume. Exactness rests on three things: the sampler and every augmentation are functions of
(seed, epoch, index), the data loaders never draw from the global RNG, and the global RNG
state is checkpointed at step boundaries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch import nn

from symconvert.checks import require_finite
from symconvert.errors import DataError, SymconvertError, TrainingError
from symconvert.tasks import Task, get_task, task_for_data
from symconvert.tasks.data import DataSpec, Loaders, create_loaders, describe
from symconvert.train.evaluate import resolve_device

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
CHECKPOINT_FORMAT = "symconvert-train"
CHECKPOINT_VERSION = 1

LOG_SECONDS = 30.0  # plain progress lines (no terminal): at most this far apart

err_console = Console(stderr=True)


@dataclass
class FinetuneConfig:
    """Training flags. Defaults recover a converted model (short, gentle, distilled);
    they are not a recipe for training from scratch."""

    epochs: int = 2
    lr: float | None = None  # None: 0.01 for sgd, 3e-4 for adamw
    batch_size: int = 64  # per process (torchrun: global batch = batch_size × processes)
    opt: str = "sgd"
    momentum: float = 0.9
    sched: str = "cosine"
    decay_milestones: tuple[int, ...] | None = None  # multistep: epochs at which lr *= decay_rate
    decay_rate: float = 0.1
    weight_decay: float = 5e-5
    warmup_epochs: float = 0.0
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
            self.lr = 0.01 if self.opt == "sgd" else 3e-4
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


@dataclass
class FitResult:
    """What a finished ``fit`` leaves behind."""

    out: Path
    metrics: list[dict[str, Any]] = field(default_factory=list)
    eval: dict[str, Any] = field(default_factory=dict)
    checkpoint: Path | None = None
    resumed_from: tuple[int, int] | None = None  # (epoch, step) of the checkpoint used


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM: the run stopped at a step boundary after writing its checkpoint."""


# ---------------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we called init_process_group, so we tear it down

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the torchrun group if launched by torchrun (RANK/WORLD_SIZE/LOCAL_RANK set)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    owns = False
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend, init_method="env://")
        owns = True
    return Dist(rank=rank, world_size=world, local_rank=local, owns_group=owns), device


@contextlib.contextmanager
def distributed(device: str | torch.device | None = "auto") -> Iterator[tuple[Dist, torch.device]]:
    """``setup_distributed`` for a block: the group this call created is destroyed after it."""
    dist, dev = setup_distributed(resolve_device(device))
    try:
        yield dist, dev
    finally:
        if dist.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _any_rank(dist: Dist, *flags: bool) -> list[bool]:
    """Element-wise OR of boolean flags over all ranks (one small all-reduce)."""
    if not dist.enabled:
        return list(flags)
    t = torch.tensor([float(f) for f in flags])
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


# ----------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """Every global RNG as tensors and plain types (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": torch.tensor(py_state[1], dtype=torch.int64),
                   "gauss_next": py_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_s = state["numpy"]
    np.random.set_state(("MT19937", np_s["keys"].numpy().astype(np.uint32), np_s["pos"],
                         np_s["has_gauss"], np_s["cached_gaussian"]))
    py_s = state["python"]
    random.setstate((py_s["version"], tuple(int(v) for v in py_s["state"].tolist()),
                     py_s["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)


# ----------------------------------------------------------------------- checkpoints


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write ``obj`` to ``path`` so that a crash leaves either the old file or the new one."""
    from symconvert.io.files import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A training checkpoint, read with ``weights_only=True``; damage → ``TrainingError``."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"no training checkpoint at {path}: nothing to resume. Run without "
                            "--resume to start, or point --out at the run to continue.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, foreign object: all unusable
        raise TrainingError(
            f"training checkpoint {path} is corrupt or truncated ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'unreadable'}). Delete it to start the "
            "run over, or restore a good copy."
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path} is not a symconvert training checkpoint; delete it or "
                            "choose another --out.")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise TrainingError(f"{path} has checkpoint version {ckpt.get('version')}; this "
                            f"symconvert reads version {CHECKPOINT_VERSION}.")
    missing = [k for k in ("model", "optimizer", "epoch", "step", "rng") if k not in ckpt]
    if missing:
        raise TrainingError(f"training checkpoint {path} lacks {', '.join(missing)}; it is "
                            "damaged. Delete it to start over.")
    return ckpt


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
    from timm.optim import create_optimizer_v2

    kwargs: dict[str, Any] = {}
    if config.opt == "sgd" and not config.momentum:  # plain SGD (the paper's LM); timm's is Nesterov
        return torch.optim.SGD(param_groups(model, config.weight_decay), lr=config.lr,
                               weight_decay=config.weight_decay)
    if config.opt == "sgd":
        kwargs["momentum"] = config.momentum
    return create_optimizer_v2(param_groups(model, config.weight_decay), opt=config.opt,
                               lr=config.lr, weight_decay=config.weight_decay, **kwargs)


def create_scheduler(optimizer: torch.optim.Optimizer, config: FinetuneConfig,
                     steps_per_epoch: int) -> Any:
    """timm scheduler stepped per optimiser update (short runs need intra-epoch decay)."""
    from timm.scheduler import create_scheduler_v2

    sched = {"none": "constant"}.get(config.sched, config.sched)
    milestones = {"decay_milestones": list(config.decay_milestones)} if config.decay_milestones else {}
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=sched, num_epochs=config.epochs,
        decay_epochs=max(1, math.ceil(config.epochs / 3)), decay_rate=config.decay_rate,
        **milestones,
        warmup_epochs=config.warmup_epochs, warmup_lr=config.lr * 0.01,  # type: ignore[arg-type]
        min_lr=config.min_lr, step_on_epochs=False, updates_per_epoch=steps_per_epoch,
    )
    return scheduler


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """Hinton's KL(teacher_T ‖ student_T) · T², on temperature-softened logits (the tasks'
    shared form: ``Task.distillation_loss``)."""
    return get_task("classification").distillation_loss(student, teacher, temperature)


# ---------------------------------------------------------------------------- loop


class _StopSignals:
    """SIGINT/SIGTERM → a flag the loop checks at each step; a second SIGINT aborts now."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> _StopSignals:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _amp_setup(config: FinetuneConfig, device: torch.device
               ) -> tuple[Callable[[], contextlib.AbstractContextManager], Any, bool]:
    use_amp = (device.type == "cuda") if config.amp is None else config.amp
    if not use_amp:
        return contextlib.nullcontext, None, False
    if config.amp_dtype:
        dtype = getattr(torch, config.amp_dtype)
    elif device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.bfloat16
    scaler = None
    if dtype == torch.float16 and device.type == "cuda":
        scaler = torch.amp.GradScaler("cuda")
    return (lambda: torch.autocast(device_type=device.type, dtype=dtype)), scaler, True


def _write_metrics(out: Path, metrics: list[dict[str, Any]]) -> None:
    """Rewrite metrics.jsonl atomically (a resumed run drops lines past its checkpoint)."""
    from symconvert.io.files import atomic_write_text

    atomic_write_text(out / METRICS_NAME,
                      "".join(json.dumps(row, sort_keys=True) + "\n" for row in metrics))


def _tensorboard(out: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: metrics.jsonl is enough
        return None
    return SummaryWriter(str(out / "tensorboard"))


@contextlib.contextmanager
def _progress(enabled: bool, unit: str = "img") -> Iterator[Any]:
    if not enabled:
        yield None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.4f}  {task.fields[info]}"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns, console=err_console, transient=False) as progress:
        yield progress


def fit(model: nn.Module, data: str | DataSpec | Loaders, out: str | os.PathLike,
        config: FinetuneConfig | None = None, *, teacher: nn.Module | None = None,
        resume: bool = False, progress: bool = True,
        on_step: Callable[[int, int, float], None] | None = None) -> FitResult:
    """Train ``model`` in place on ``data``; write ``out/checkpoint.pt`` and ``out/metrics.jsonl``.

    The data's task (``symconvert.tasks``) supplies the loss, the metrics and any state a
    step carries to the next (an RNN's hidden state, checkpointed with the rest).
    ``teacher`` (when ``config.distill``) supplies soft targets. ``resume`` continues from
    ``out/checkpoint.pt``. ``on_step(epoch, step, loss)`` is called after every optimiser
    step (tests use it to interrupt a run). Under torchrun every rank calls ``fit``.
    """
    config = config or FinetuneConfig()
    with distributed(config.device) as (dist, device):
        return _Run(model, data, Path(out), config, teacher, dist, device).fit(
            resume, progress, on_step)


class _Run:
    """One ``fit``: the model, its optimiser state and the loop, in steps of a page each."""

    def __init__(self, model: nn.Module, data: Any, out: Path, config: FinetuneConfig,
                 teacher: nn.Module | None, dist: Dist, device: torch.device) -> None:
        self.model, self.out, self.config, self.dist, self.device = model, out, config, dist, device
        if dist.main:
            out.mkdir(parents=True, exist_ok=True)
        self.ckpt_path = out / CHECKPOINT_NAME
        seed_everything(config.seed + dist.rank)
        self.loaders = data if isinstance(data, Loaders) else build_loaders(
            data, model, config, dist, device)
        if self.loaders.train is None:
            raise SymconvertError("fit needs a train loader (create_loaders(..., train=True))")
        self.task = get_task(self.loaders.task)
        self.task.check_model(model, self.loaders)
        if config.amp and device.type == "cpu" and self.task.cpu_amp_unsupported:
            raise SymconvertError(f"--amp on the CPU: {self.task.cpu_amp_unsupported}. Use "
                                  "--no-amp on the CPU, or AMP on a CUDA device.")
        self.steps_per_epoch = len(self.loaders.train)
        self.teacher = self._place(model, teacher if config.distill else None)
        self.optimizer = create_optimizer(model, config)
        self.scheduler = create_scheduler(self.optimizer, config, self.steps_per_epoch)
        self.autocast, self.scaler, self.amp_on = _amp_setup(config, device)
        self.metrics: list[dict[str, Any]] = []
        self.start_epoch = self.start_step = self.global_step = 0
        self.stats = _fresh_stats()
        self.carry: Any = None

    def _place(self, model: nn.Module, teacher: nn.Module | None) -> nn.Module | None:
        channels_last = self.device.type == "cuda"
        for m in (model, teacher):
            if m is None:
                continue
            m.to(self.device)
            if channels_last:
                m.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        return teacher

    def restore(self, ckpt: dict[str, Any]) -> None:
        """Continue from a checkpoint: weights, optimiser, schedule, scaler, RNG, carry."""
        _check_same_run(ckpt, self.config, self.dist, self.ckpt_path)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scheduler") is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.start_epoch, self.start_step = int(ckpt["epoch"]), int(ckpt["step"])
        self.global_step = int(ckpt.get("global_step", self.start_epoch * self.steps_per_epoch
                                        + self.start_step))
        self.stats = dict(ckpt.get("epoch_stats") or self.stats)
        self.metrics = [dict(m) for m in ckpt.get("metrics", [])]
        rng, carry = ckpt["rng"], ckpt.get("carry")
        set_rng_state(rng[self.dist.rank] if isinstance(rng, list) else rng)
        self.carry = carry[self.dist.rank] if isinstance(carry, list) else carry
        if self.dist.main:
            _write_metrics(self.out, self.metrics)
            err_console.print(f"resuming {self.out} at epoch {self.start_epoch + 1}, step "
                              f"{self.start_step}", highlight=False)

    def checkpoint(self, epoch: int, step: int, rng: dict[str, Any], carry: Any) -> None:
        """Write the training state atomically (rank 0), with every rank's RNG and carry."""
        dist = self.dist
        if dist.enabled:
            gathered: list[Any] = [None] * dist.world_size
            torch.distributed.all_gather_object(gathered, (rng, _cpu(carry)))
            rngs: Any = [g[0] for g in gathered]
            carries: Any = [g[1] for g in gathered]
        else:
            rngs, carries = rng, _cpu(carry)
        if dist.main:
            require_finite(self.model, f"checkpoint {self.ckpt_path}")
            atomic_torch_save({
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "epoch": epoch, "step": step, "global_step": self.global_step,
                "epoch_stats": dict(self.stats), "metrics": self.metrics, "rng": rngs,
                "carry": carries, "task": self.task.name,
                "config": _plain(asdict(self.config)), "world_size": dist.world_size,
                "steps_per_epoch": self.steps_per_epoch,
            }, self.ckpt_path)
        if dist.enabled:
            torch.distributed.barrier()

    def fit(self, resume: bool, progress: bool, on_step: Callable | None) -> FitResult:
        if resume:
            self.restore(load_checkpoint(self.ckpt_path))
        self.scheduler.step_update(self.global_step)
        self.train_model: nn.Module = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.train_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        writer = _tensorboard(self.out) if self.dist.main else None
        result = FitResult(out=self.out, checkpoint=self.ckpt_path,
                           resumed_from=(self.start_epoch, self.start_step) if resume else None)
        show = progress and self.dist.main
        bar_on = show and err_console.is_terminal
        self.log = StepLog(self.config, self.task.unit, self.steps_per_epoch,
                           enabled=show and not bar_on)
        with _StopSignals() as stop, _progress(bar_on, self.task.unit) as bar:
            for epoch in range(self.start_epoch, self.config.epochs):
                self.train_epoch(epoch, stop, bar, on_step)
                result.eval = self.end_epoch(epoch, writer)
        if writer is not None:
            writer.close()
        result.metrics = self.metrics
        if not result.eval and self.metrics:  # resumed a finished run: nothing left to train
            last = self.metrics[-1]
            result.eval = {k[len("eval_"):]: v for k, v in last.items()
                           if k.startswith("eval_") and k != "eval_time" and v is not None}
        return result

    def train_epoch(self, epoch: int, stop: _StopSignals, bar: Any,
                    on_step: Callable | None) -> None:
        first = self.start_step if epoch == self.start_epoch else 0
        if first == 0:
            self.stats, self.carry = _fresh_stats(), self.task.start_epoch()
        self.loaders.set_epoch(epoch, first)
        self.train_model.train()
        task_id = bar.add_task(f"epoch {epoch + 1}/{self.config.epochs}",
                               total=self.steps_per_epoch, completed=first, loss=0.0,
                               info="") if bar else None
        t_epoch = time.perf_counter()
        step = first
        for batch in self.loaders.train:
            state_before, carry_before = rng_state(), self.carry  # a stop replays this step
            with self.autocast():
                output, carry = self.task.step(self.train_model, self.teacher, batch,
                                               self.device, self.config, self.carry)
            self.check_step(output.loss, epoch, step, stop, state_before, carry_before)
            self.optimizer_step(output.loss)
            self.carry = carry
            self.global_step += 1
            step += 1
            self.scheduler.step_update(self.global_step)
            loss_value = float(output.loss.detach())
            self.stats["loss_sum"] += loss_value * output.seen
            self.stats["correct"] += output.correct
            self.stats["seen"] += output.seen
            elapsed = self.stats["time"] + time.perf_counter() - t_epoch
            rate = self.stats["seen"] * self.dist.world_size / max(elapsed, 1e-9)
            if bar is not None:
                bar.update(task_id, advance=1, loss=self.stats["loss_sum"] / self.stats["seen"],
                           info=self._bar_info(rate))
            self.log.step(epoch, step, self.global_step, self.stats["loss_sum"] /
                          self.stats["seen"], rate)
            if on_step is not None:
                on_step(epoch, step, loss_value)
            every = self.config.checkpoint_every
            if every and self.global_step % every == 0 and step < self.steps_per_epoch:
                self.stats["time"] += time.perf_counter() - t_epoch
                t_epoch = time.perf_counter()
                self.checkpoint(epoch, step, rng_state(), self.carry)
        self.stats["time"] += time.perf_counter() - t_epoch

    def _bar_info(self, rate: float) -> str:
        if self.task.unit == "img":
            return (f"acc {self.stats['correct'] / max(self.stats['seen'], 1):.2%}  "
                    f"{rate:.0f} img/s")
        return f"{rate:.0f} {self.task.unit}/s"

    def check_step(self, loss: torch.Tensor, epoch: int, step: int, stop: _StopSignals,
                   state_before: dict[str, Any], carry_before: Any) -> None:
        """Non-finite loss → error before the update; a signal → checkpoint and stop."""
        bad, stopping = _any_rank(self.dist, not bool(torch.isfinite(loss.detach())),
                                  stop.requested is not None)
        if bad:
            raise TrainingError(
                f"the loss became non-finite ({loss.item()}) at epoch {epoch + 1}, step "
                f"{step + 1}; training stopped before the update. The last good checkpoint "
                f"({self.ckpt_path}) is kept. Lower --lr, keep gradient clipping on, or try "
                "--no-amp, then resume with --resume or start over.")
        if stopping:
            self.checkpoint(epoch, step, state_before, carry_before)
            raise TrainingInterrupted(
                f"stopped by {stop.requested or 'a signal'} at epoch {epoch + 1}, step {step}; "
                f"checkpoint {self.ckpt_path} written. Continue with the same command plus "
                "--resume.")

    def optimizer_step(self, loss: torch.Tensor) -> None:
        clip, params = self.config.clip_grad, self.model.parameters()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(params, clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(params, clip)
            self.optimizer.step()

    def end_epoch(self, epoch: int, writer: Any) -> dict[str, Any]:
        """Evaluate, append the metrics row (rank 0 writes it), checkpoint the epoch."""
        train_time = self.stats["time"]
        totals = _sum_over_ranks(self.dist, self.stats)
        t_eval = time.perf_counter()
        scores = self.task.evaluate(self.model, self.loaders, self.device,
                                    self.autocast() if self.amp_on else None)
        eval_time = time.perf_counter() - t_eval
        rate_key = "images_per_s" if self.task.unit == "img" else "tokens_per_s"
        row = {"epoch": epoch + 1, "step": self.global_step,
               **self.task.epoch_row(totals, scores),
               "lr": self.optimizer.param_groups[-1]["lr"],
               rate_key: totals["seen"] / max(train_time, 1e-9),
               "time": train_time + eval_time, "eval_time": eval_time}
        self.metrics.append(row)
        if self.dist.main:
            _write_metrics(self.out, self.metrics)
            if writer is not None:
                for key, value in row.items():
                    if key.startswith(("train_", "eval_", "lr", rate_key)) and \
                            isinstance(value, (int, float)):
                        writer.add_scalar(key, value, epoch + 1)
                writer.flush()
            err_console.print(
                f"epoch {epoch + 1}/{self.config.epochs}: loss {row['train_loss']:.4f}  "
                + (f"train top-1 {row['train_top1']:.2%}  " if "train_top1" in row else "")
                + f"{self.task.describe_scores(scores)}  ({row[rate_key]:.0f} "
                  f"{self.task.unit}/s)", highlight=False)
        self.stats = _fresh_stats()
        self.checkpoint(epoch + 1, 0, rng_state(), self.task.start_epoch())
        return scores


def _fresh_stats() -> dict[str, Any]:
    return {"loss_sum": 0.0, "correct": 0, "seen": 0, "time": 0.0}


def _cpu(value: Any) -> Any:
    """A carried state with its tensors on the CPU (checkpoints load weights_only)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu(v) for v in value)
    return value


class StepLog:
    """Plain progress lines for logs that are not a terminal (nohup, SLURM, CI), as timm's
    ``log_interval``: one line every ``log_interval`` steps, or every ~30 s when 0."""

    def __init__(self, config: FinetuneConfig, unit: str, steps_per_epoch: int,
                 enabled: bool) -> None:
        self.enabled, self.unit = enabled, unit
        self.every, self.seconds = config.log_interval, LOG_SECONDS
        self.epochs, self.per_epoch = config.epochs, steps_per_epoch
        self.t0 = self.last = time.perf_counter()
        self.first_step: int | None = None

    def step(self, epoch: int, step: int, global_step: int, loss: float, rate: float) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.first_step is None:
            self.first_step = global_step - 1
        due = (global_step % self.every == 0) if self.every else (now - self.last >= self.seconds)
        if not due:
            return
        self.last = now
        done = global_step - self.first_step
        left = self.epochs * self.per_epoch - global_step
        eta = (now - self.t0) / max(done, 1) * left
        err_console.print(
            f"epoch {epoch + 1}/{self.epochs} step {step}/{self.per_epoch}  loss {loss:.4f}  "
            f"{rate:.0f} {self.unit}/s  ETA {_clock(eta)}", highlight=False, soft_wrap=True)


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def build_loaders(data: str | DataSpec, model: nn.Module, config: FinetuneConfig, dist: Dist,
                  device: torch.device) -> Loaders:
    """This rank's loaders. With ``--download`` rank 0 fetches first, the others wait."""

    def build(download: bool) -> Loaders:
        return create_loaders(
            data, model, batch_size=config.batch_size, workers=config.workers,
            input_size=config.input_size, subsample=config.subsample, seed=config.seed,
            augment=config.augment, download=download, rank=dist.rank,
            world_size=dist.world_size, pin_memory=device.type == "cuda", bptt=config.bptt)

    if not (dist.enabled and config.download):
        return build(config.download)
    loaders = build(True) if dist.main else None
    torch.distributed.barrier()
    return loaders if loaders is not None else build(False)


def _sum_over_ranks(dist: Dist, stats: dict[str, Any]) -> dict[str, Any]:
    if not dist.enabled:
        return dict(stats)
    t = torch.tensor([stats["loss_sum"], float(stats["correct"]), float(stats["seen"])],
                     dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t)
    return {"loss_sum": float(t[0]), "correct": int(t[1]), "seen": int(t[2]),
            "time": stats["time"]}


def _plain(value: Any) -> Any:
    """JSON-able copy (tuples → lists, paths → str) for checkpoints and metadata."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _check_same_run(ckpt: dict[str, Any], config: FinetuneConfig, dist: Dist,
                    path: Path) -> None:
    saved = ckpt.get("config") or {}
    now = _plain(asdict(config))
    changed = [f"--{k.replace('_', '-')} {saved.get(k)!r} → {now.get(k)!r}"
               for k in FinetuneConfig.TRAJECTORY if k in saved and saved.get(k) != now.get(k)]
    if ckpt.get("world_size", 1) != dist.world_size:
        changed.append(f"processes {ckpt.get('world_size', 1)} → {dist.world_size}")
    if changed:
        raise TrainingError(
            f"--resume: {path} was written by a run with other settings ({'; '.join(changed)}). "
            "Resume with the original flags, or start a new run in another --out.")


# -------------------------------------------------------------------- the command


@dataclass
class FinetuneResult:
    out: Path
    metrics: list[dict[str, Any]]
    eval: dict[str, Any]
    params: int


def finetune(model_dir: str | os.PathLike, data: str | DataSpec, out: str | os.PathLike | None = None,
             *, teacher: str | nn.Module | None = None, num_classes: int | None = None,
             resume: bool = False, overwrite: bool = False, progress: bool = True,
             **config: Any) -> FinetuneResult:
    """Fine-tune the converted model in ``model_dir`` on ``data``; write ``out``
    (default ``model_dir/finetuned``) as a model directory plus metrics and checkpoint.

    ``config`` takes the fields of ``FinetuneConfig`` (epochs, lr, batch_size, opt, sched, ...).
    The teacher is the unconverted source model recorded in ``model_dir`` unless ``teacher``
    names another MODEL or model directory.
    """

    from symconvert.checks import check_finetune_args
    from symconvert.io.files import output_dir

    check_finetune_args(num_classes=num_classes, **config)
    cfg = FinetuneConfig(**task_config(data, config))
    model_dir = Path(model_dir)
    out = Path(out) if out is not None else model_dir / "finetuned"
    _check_output(out, resume, overwrite)
    with distributed(cfg.device) as (dist, device):
        # created (and locked) only now; removed again if the run fails before writing
        with output_dir(out, inputs=[model_dir], enabled=dist.main):
            return _finetune(model_dir, data, out, cfg, teacher, num_classes, resume,
                             progress, dist, device)


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


def _finetune(model_dir: Path, data: str | DataSpec, out: Path, cfg: FinetuneConfig,
              teacher: str | nn.Module | None, num_classes: int | None, resume: bool,
              progress: bool, dist: Dist, device: torch.device) -> FinetuneResult:
    import symconvert
    from symconvert.io.checkpoint import check_writable
    from symconvert.models.sources import reset_head
    from symconvert.tasks.data import model_num_outputs

    if dist.main:
        check_writable(out, overwrite=True)
        _ensure_writable(out)
    student = symconvert.load(model_dir)
    source = dict(student.symconvert_source)
    loaders = build_loaders(data, student, cfg, dist, device)
    if num_classes is not None and num_classes != loaders.num_classes:
        raise DataError(f"--num-classes {num_classes} but --data {loaders.spec.text} has "
                        f"{loaders.num_classes} classes; use --num-classes "
                        f"{loaders.num_classes}.")
    head_reset = False
    if num_classes is not None and loaders.task != "classification":
        raise DataError(f"--num-classes is for classifiers; --data {loaders.spec.text} is a "
                        f"{loaders.task} task.")
    if num_classes is not None and model_num_outputs(student, loaders.image_config) != num_classes:
        torch.manual_seed(cfg.seed)  # the new head is initialised identically on every rank
        reset_head(student, num_classes)
        student.symconvert_source = {**source, "num_classes": num_classes}
        head_reset = True

    teacher_model: nn.Module | None = None
    if cfg.distill:
        teacher_model = _build_teacher(teacher, source)
        t_out = (model_num_outputs(teacher_model, loaders.image_config)
                 if loaders.task == "classification" else loaders.num_classes)
        if t_out != loaders.num_classes:
            if dist.main:
                err_console.print(
                    f"[yellow]warning:[/] the teacher has {t_out} outputs but the data has "
                    f"{loaders.num_classes} classes"
                    f"{' (the head was reset)' if head_reset else ''}; distillation is off "
                    "for this run. Pass --teacher with a model trained on these classes to "
                    "distil.", highlight=False)
            teacher_model = None
            cfg = dataclasses.replace(cfg, distill=False)

    result = fit(student, loaders, out, cfg, teacher=teacher_model, resume=resume,
                 progress=progress)
    if dist.main:
        args = dict(_plain(asdict(cfg)))
        args.update({"data": str(data), "num_classes": num_classes,
                     "teacher": teacher if isinstance(teacher, str) else
                     ("source" if teacher_model is not None else None)})
        student.to("cpu", memory_format=torch.contiguous_format)
        symconvert.save(student, out, extra_metadata={
            "finetune": {"args": args, "eval": result.eval,
                         "epochs_run": len(result.metrics)},
            "parent": str(model_dir.resolve()),
            **loaders.meta.get("record", {}),  # e.g. the vocabulary a language model reads
        })
    return FinetuneResult(out=out, metrics=result.metrics, eval=result.eval,
                          params=symconvert.count_parameters(student))


def _check_output(out: Path, resume: bool, overwrite: bool) -> None:
    """A finished or half-finished run in ``out`` is never silently overwritten."""
    if out.exists() and not out.is_dir():
        raise SymconvertError(f"--out {out} exists and is not a directory; choose another --out.")
    if resume or overwrite:
        return
    for name in (CHECKPOINT_NAME, "model.safetensors"):
        if (out / name).exists():
            raise SymconvertError(
                f"{out} already holds a fine-tuning run ({name}). Pass --resume to continue it, "
                "--overwrite to start over in place, or choose another --out.")


def _ensure_writable(out: Path) -> None:
    # os.access() says yes to root everywhere; only a real write proves the directory usable.
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".symconvert-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise SymconvertError(
            f"cannot write the fine-tuned model to {out}: {exc.strerror or exc}. Choose a "
            "writable directory with --out.") from None


def _build_teacher(teacher: str | nn.Module | None, source: dict[str, Any]) -> nn.Module:
    import symconvert
    from symconvert.models.sources import create_model_from_source

    if isinstance(teacher, nn.Module):
        return teacher
    if teacher is None:
        if not source.get("pretrained") and not source.get("weights"):
            raise SymconvertError(
                "distillation needs the unconverted source model as teacher, but the converted "
                f"model's source ({source.get('library')}:{source.get('name')}) has neither "
                "pretrained weights nor a weights file. Pass --teacher MODEL_OR_DIR, or "
                "--no-distill.")
        return create_model_from_source(source)
    if Path(teacher).is_dir():
        return symconvert.load(teacher)
    return symconvert.create_model(teacher)


__all__ = ["CHECKPOINT_NAME", "METRICS_NAME", "FinetuneConfig", "FinetuneResult", "FitResult",
           "TrainingInterrupted", "atomic_torch_save", "distillation_loss", "describe",
           "finetune", "fit", "load_checkpoint", "param_groups", "rng_state", "set_rng_state"]
