"""The training loop that recovers a converted model's accuracy (SPEC §6).

``symconvert.train.run.finetune(DIR, data)`` (the command) trains with ``fit``; the flags are
``symconvert.train.config``, torchrun ``symconvert.train.distributed``, the RNG and
checkpoints ``symconvert.train.state``, the optimiser and schedule ``symconvert.train.optim``.

``fit(model, data, out, config)`` is the loop itself, for any ``nn.Module``:
timm's optimiser and scheduler factories, AMP, gradient clipping, distillation, DDP under
``torchrun``, atomic checkpoints every epoch / every N steps / on SIGINT and SIGTERM, and exact
resume. Exactness rests on three things: the sampler and every augmentation are functions of
(seed, epoch, index), the data loaders never draw from the global RNG, and the global RNG
state is checkpointed at step boundaries.
"""


from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from symconvert.checks import non_finite
from symconvert.errors import Interrupted, SymconvertError, TrainingError
from symconvert.io.signals import interrupt
from symconvert.tasks import get_task
from symconvert.tasks.data import DataSpec, Loaders, create_loaders
from symconvert.train.config import FinetuneConfig, plain
from symconvert.train.distributed import Dist, any_rank, distributed, sum_over_ranks
from symconvert.train.features import BlockDistill
from symconvert.train.optim import create_optimizer, create_scheduler
from symconvert.train.progress import StepLog, err_console, progress_bars, tensorboard
from symconvert.train.state import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    CHECKPOINT_VERSION,
    atomic_torch_save,
    check_same_run,
    load_checkpoint,
    rng_state,
    seed_everything,
    set_rng_state,
    write_metrics,
)


@dataclass
class FitResult:
    """What a finished ``fit`` leaves behind."""

    out: Path
    metrics: list[dict[str, Any]] = field(default_factory=list)
    eval: dict[str, Any] = field(default_factory=dict)
    checkpoint: Path | None = None
    resumed_from: tuple[int, int] | None = None  # (epoch, step) of the checkpoint used


class TrainingInterrupted(Interrupted):
    """SIGINT/SIGTERM: the run stopped at a step boundary after writing its checkpoint."""


# ---------------------------------------------------------------------------- loop


class _StopSignals:
    """SIGINT/SIGTERM → a flag the loop checks at each step; a second SIGINT aborts now."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            interrupt(signum)
        self.signum = self.signum or signum
        self.requested = signal.Signals(self.signum).name

    def __enter__(self) -> _StopSignals:
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



def fit(model: nn.Module, data: str | DataSpec | Loaders, out: str | os.PathLike,
        config: FinetuneConfig | None = None, *, teacher: nn.Module | None = None,
        resume: bool = False, progress: bool = True,
        on_step: Callable[[int, int, float], None] | None = None) -> FitResult:
    """Train ``model`` in place on ``data``; write ``out/checkpoint.pt`` and ``out/metrics.jsonl``.

    The data's task (``symconvert.tasks``) supplies the loss, the metrics and any state a
    step carries to the next (an RNN's hidden state, checkpointed with the rest).
    ``teacher`` (when ``config.distill``) supplies soft targets, and with
    ``config.distill_features`` its block outputs. ``resume`` continues from
    ``out/checkpoint.pt``. ``on_step(epoch, step, loss)`` is called after every optimiser
    step (tests use it to interrupt a run). Under torchrun every rank calls ``fit``.
    """
    config = config or FinetuneConfig()
    with distributed(config.device) as (dist, device):
        run = _Run(model, data, Path(out), config, teacher, dist, device)
        try:
            return run.fit(resume, progress, on_step)
        finally:
            if run.features is not None:  # the model leaves without the distillation hooks
                run.features.remove()


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
        self.features = (BlockDistill(model, self.teacher, config.distill_features)
                         if self.teacher is not None and config.distill_features > 0 else None)
        self.optimizer = create_optimizer(model, config)
        self.scheduler = create_scheduler(self.optimizer, config, self.steps_per_epoch)
        self.autocast, self.scaler, self.amp_on = _amp_setup(config, device)
        self.metrics: list[dict[str, Any]] = []
        self.start_epoch = self.start_step = self.global_step = 0
        self.stats = _fresh_stats()
        self.carry: Any = None
        self.stopping = False  # a signal was seen: stop at the next step boundary
        self.wrote_checkpoint = False  # this run has a good checkpoint on disk

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
        check_same_run(ckpt, self.config, self.dist, self.ckpt_path)
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
            write_metrics(self.out, self.metrics)
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
        name = non_finite(self.model)
        if name is not None:  # diverged: the last good checkpoint stays as it is
            raise TrainingError(self.diverged(f"{name} holds non-finite values (NaN/inf) at "
                                              f"epoch {epoch + 1}, step {step}"))
        if dist.main:
            atomic_torch_save({
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "epoch": epoch, "step": step, "global_step": self.global_step,
                "epoch_stats": dict(self.stats), "metrics": self.metrics, "rng": rngs,
                "carry": carries, "task": self.task.name,
                "config": plain(self.config), "world_size": dist.world_size,
                "steps_per_epoch": self.steps_per_epoch,
            }, self.ckpt_path)
        self.wrote_checkpoint = True
        if dist.enabled:
            torch.distributed.barrier()

    def fit(self, resume: bool, progress: bool, on_step: Callable | None) -> FitResult:
        if resume:
            self.restore(load_checkpoint(self.ckpt_path))
            self.wrote_checkpoint = True
        self.scheduler.step_update(self.global_step)
        self.train_model: nn.Module = self.model
        if self.dist.enabled:
            self.train_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        writer = tensorboard(self.out) if self.dist.main else None
        result = FitResult(out=self.out, checkpoint=self.ckpt_path,
                           resumed_from=(self.start_epoch, self.start_step) if resume else None)
        show = progress and self.dist.main
        bar_on = show and err_console.is_terminal
        self.log = StepLog(self.config, self.task.unit, self.steps_per_epoch,
                           enabled=show and not bar_on)
        with _StopSignals() as stop, progress_bars(bar_on, self.task.unit) as bar:
            for epoch in range(self.start_epoch, self.config.epochs):
                self.train_epoch(epoch, stop, bar, on_step)
                result.eval = self.end_epoch(epoch, writer)
            if any_rank(self.dist, stop.requested is not None)[0]:  # during the last epoch's end
                self.stop(self.config.epochs, 0, stop)
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
            if self.stop_now(stop):  # at a step boundary: nothing of this step has run
                self.stats["time"] += time.perf_counter() - t_epoch
                self.stop(epoch, step, stop)
            with self.autocast():
                output, carry = self.task.step(self.train_model, self.teacher, batch,
                                               self.device, self.config, self.carry)
                extra = self.features.loss() if self.features is not None else None
                if extra is not None:
                    output.loss = output.loss + extra
            self.check_step(output.loss, epoch, step, stop)
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
                           info=self.task.describe_progress(self.stats, rate))
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
        if self.stop_now(stop):  # the epoch's steps are done; its evaluation runs on resume
            self.stop(epoch, step, stop)

    def check_step(self, loss: torch.Tensor, epoch: int, step: int, stop: _StopSignals) -> None:
        """Non-finite loss → error before the update. A signal (on any rank) → stop at the
        next step boundary (``self.stopping``, agreed by every rank in the same reduction):
        this step's forward already changed BatchNorm statistics, so stopping before its
        update would checkpoint a state no uninterrupted run passes through."""
        bad, stopping = any_rank(self.dist, not bool(torch.isfinite(loss.detach())),
                                  stop.requested is not None)
        self.stopping = self.stopping or stopping
        if bad:
            raise TrainingError(self.diverged(f"the loss became non-finite ({loss.item()}) at "
                                              f"epoch {epoch + 1}, step {step + 1}; training "
                                              "stopped before the update"))

    def diverged(self, what: str) -> str:
        """The non-finite stop's message: what happened, what is kept, the way out."""
        if self.wrote_checkpoint:
            kept = (f"The last checkpoint with finite weights ({self.ckpt_path}) is kept; "
                    "--resume continues from it with the same flags.")
            again = "start over with --overwrite"
        else:
            kept, again = "No checkpoint had been written yet, so nothing is kept.", "run again"
        return (f"{what}. {kept} Lower --lr and {again}, keep gradient clipping on "
                "(--clip-grad), or try --no-amp.")

    def stop_now(self, stop: _StopSignals) -> bool:
        """Whether to stop at this step boundary: a signal seen by every rank's last
        reduction, or (one process) any signal so far."""
        return self.stopping or (not self.dist.enabled and stop.requested is not None)

    def stop(self, epoch: int, step: int, stop: _StopSignals) -> None:
        """Checkpoint at this step boundary and raise ``TrainingInterrupted``."""
        self.checkpoint(epoch, step, rng_state(), self.carry)
        name = stop.requested or "a signal on another process"
        where = "after the last epoch" if epoch >= self.config.epochs else \
            f"at epoch {epoch + 1}, step {step}"
        raise TrainingInterrupted(
            stop.signum or signal.SIGTERM,
            f"stopped by {name} {where}; checkpoint {self.ckpt_path} written. Continue with "
            "the same command plus --resume.")

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
        totals = sum_over_ranks(self.dist, self.stats)
        t_eval = time.perf_counter()
        scores = self.task.evaluate(self.model, self.loaders, self.device,
                                    self.autocast() if self.amp_on else None)
        bad = [m.label for m in self.task.score_metrics
               if not math.isfinite(scores.get(m.key, 0.0))]
        if bad:
            raise TrainingError(self.diverged(f"the evaluation after epoch {epoch + 1} gave a "
                                              f"non-finite {bad[0]}: the model diverged"))
        eval_time = time.perf_counter() - t_eval
        rate_key = self.task.rate_key
        row = {"epoch": epoch + 1, "step": self.global_step,
               **self.task.epoch_row(totals, scores),
               "lr": self.optimizer.param_groups[-1]["lr"],
               rate_key: totals["seen"] / max(train_time, 1e-9),
               "time": train_time + eval_time, "eval_time": eval_time}
        self.metrics.append(row)
        if self.dist.main:
            write_metrics(self.out, self.metrics)
            if writer is not None:
                for key, value in row.items():
                    if key.startswith(("train_", "eval_", "lr", rate_key)) and \
                            isinstance(value, (int, float)):
                        writer.add_scalar(key, value, epoch + 1)
                writer.flush()
            err_console.print(
                f"epoch {epoch + 1}/{self.config.epochs}: loss {row['train_loss']:.4f}  "
                + self.task.describe_train(row)
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


__all__ = ["FitResult", "StepLog", "TrainingInterrupted", "build_loaders", "fit"]
