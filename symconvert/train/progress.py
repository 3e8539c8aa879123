"""What a training run shows while it runs: rich progress bars on a terminal, plain log
lines elsewhere (``StepLog``), and TensorBoard scalars when it is installed."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from symconvert.train.config import FinetuneConfig

LOG_SECONDS = 30.0  # plain progress lines (no terminal): at most this far apart

err_console = Console(stderr=True)


def tensorboard(out: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: metrics.jsonl is enough
        return None
    return SummaryWriter(str(out / "tensorboard"))


@contextlib.contextmanager
def progress_bars(enabled: bool, unit: str = "img") -> Iterator[Any]:
    if not enabled:
        yield None
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.4f}  {task.fields[info]}"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns, console=err_console, transient=False) as progress:
        yield progress


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


__all__ = ["LOG_SECONDS", "StepLog", "err_console", "progress_bars", "tensorboard"]
