"""Small models for the tests, reachable as `py:toy_models:<function>` MODEL strings
(tests/ is put on sys.path / PYTHONPATH by conftest.py)."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Every conv flavour the planner must tell apart, in a few thousand parameters."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)                        # 8x3: not square
        self.conv = nn.Conv2d(8, 8, 3, padding=1)                        # square 3x3
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)           # 2 blocks of 4x4
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)         # 1x1 blocks
        self.pointwise = nn.Conv2d(8, 16, 1)                             # 16x8, 1x1
        self.norm = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 16)                                      # square linear
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.conv(x))
        x = torch.relu(self.grouped(x))
        x = torch.relu(self.depthwise(x))
        x = torch.relu(self.norm(self.pointwise(x)))
        x = self.pool(x).flatten(1)
        return self.head(torch.relu(self.fc(x)))


def small_cnn(num_classes: int = 10) -> nn.Module:
    return SmallCNN(num_classes)


class TiedModel(nn.Module):
    """Weight sharing both ways: one module called twice (`block`), and two modules
    holding one Parameter (`enc.weight is dec.weight`)."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.block = nn.Conv2d(4, 4, 3, padding=1)
        self.enc = nn.Linear(16, 16)
        self.dec = nn.Linear(16, 16)
        self.dec.weight = self.enc.weight
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.block(torch.relu(self.block(x))))
        x = torch.relu(self.enc(x.flatten(1)))
        return self.head(torch.relu(self.dec(x)))


def tied_model(num_classes: int = 3) -> nn.Module:
    return TiedModel(num_classes)


def not_a_module() -> int:
    return 3
