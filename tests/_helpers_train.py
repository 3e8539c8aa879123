"""Small models and helpers for the fine-tuning tests, reachable as ``py:_helpers_train:NAME``
MODEL strings (conftest.py puts tests/ on sys.path; ``cli_env`` does it for child processes)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


class Block(nn.Module):
    """CIFAR-style post-activation basic block; square 3×3 convs when in == out."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.short(x))


class TinyResNet(nn.Module):
    """ResNet-8 for 1-channel 28×28 images: stem, three one-block stages, pool, fc."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1,
                 widths: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(Block(cin, w, 1 if i == 0 else 2))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(x.mean((2, 3)))


def tiny_resnet(num_classes: int = 10, in_chans: int = 1) -> nn.Module:
    return TinyResNet(num_classes, in_chans)


def tiny_mlp(num_classes: int = 10) -> nn.Module:
    """BatchNorm-free model for digits (8×8): DDP must match single-process to float noise."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64),
                         nn.Tanh(), nn.Linear(64, num_classes))


def tiny_cnn(num_classes: int = 10) -> nn.Module:
    """A small conv net for 8×8 digits with square 3×3 convs and dropout."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Dropout(0.1),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes),
    )


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Intra-op threads fight the other xdist worker for 2 cores; one thread is much faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cli_env(threads: int = 1) -> dict[str, str]:
    """Environment for a ``python -m symconvert`` child: tests/ importable, few threads."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO / "tests"), str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    env.setdefault("COLUMNS", "120")
    return env


def start_cli(*args: str | os.PathLike, threads: int = 1) -> subprocess.Popen:
    """``python -m symconvert ARGS`` started in the background (for kill/term tests)."""
    return subprocess.Popen([sys.executable, "-m", "symconvert", *map(str, args)], cwd=REPO,
                            env=cli_env(threads), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors that differ (empty: bit-identical)."""
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def metrics(out: Path) -> list[dict]:
    """The rows of ``OUT/metrics.jsonl``."""
    from symconvert.train.state import METRICS_NAME

    return [json.loads(line) for line in (out / METRICS_NAME).read_text().splitlines()]


def ddp_and_single(cli, ddp_args: list, single_args: list) -> str:
    """``torchrun --standalone --nproc-per-node 2 -m symconvert DDP_ARGS`` in the background
    while ``cli(*SINGLE_ARGS)`` runs in this process (one thread: no extra interpreter
    start-up); both must succeed. Returns torchrun's stdout."""
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m",
                                                          "torch.distributed.run"]
    ddp = subprocess.Popen(
        [*launcher, "--standalone", "--nproc-per-node", "2", "-m", "symconvert",
         *map(str, ddp_args)],
        cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    single = cli(*single_args)
    out, err = ddp.communicate(timeout=300)
    assert ddp.returncode == 0, err
    assert single.code == 0, single
    return out


def max_weight_diff(a: Path, b: Path) -> float:
    """max |Δw| between the ``model.safetensors`` of two model directories."""
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)
