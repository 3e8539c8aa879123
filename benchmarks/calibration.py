"""Calibration cost against depth: residual networks of one width, 50 and 100 convolution
layers deep, converted with ``channel`` and calibrated layer by layer (``steps=0``) and block
by block; the time per converted layer should not grow with depth (issue 19)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def deep_resnet(layers: int, width: int = 32) -> nn.Module:
    """A stem conv, ``layers // 2`` residual blocks of two square 3×3 convs, a linear head."""
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
                         nn.Sequential(*[_Block(width) for _ in range(layers // 2)]),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))


def _child(layers: int, samples: int, size: int, steps: int) -> None:
    import symconvert
    from symconvert.surgery.calibrate import calibrate

    torch.manual_seed(0)
    source = deep_resnet(layers).eval()
    x = torch.randn(samples, 3, size, size)
    model, plan = symconvert.convert(copy.deepcopy(source), "channel")
    t0 = time.perf_counter()
    with torch.no_grad():
        source(x)
    fwd = time.perf_counter() - t0
    t0 = time.perf_counter()
    calibrate(model, source, x, samples=samples, batch_size=32, steps=steps, progress=False)
    cal = time.perf_counter() - t0
    print(json.dumps({"layers": len(plan.converted), "seconds": cal, "forward_s": fwd,
                      "seconds/layer": cal / len(plan.converted)}))


def bench_depth(samples: int = 64, size: int = 16, steps: tuple[int, ...] = (0, 20)) -> dict:
    """Calibration seconds per converted layer at 50 and 100 layers, per ``steps`` setting
    (fresh subprocesses), and the ratio 100-layer / 50-layer."""
    root = Path(__file__).resolve().parents[1]
    out: dict = {"samples": samples, "size": size}
    for s in steps:
        per = {}
        for layers in (50, 100):
            proc = subprocess.run([sys.executable, "-m", "benchmarks.calibration", str(layers),
                                   str(samples), str(size), str(s)],
                                  capture_output=True, text=True, check=True, cwd=root)
            per[layers] = json.loads(proc.stdout.strip().splitlines()[-1])
        out[f"steps={s}"] = {**{str(k): v for k, v in per.items()},
                             "per-layer 100/50": per[100]["seconds/layer"] / per[50]["seconds/layer"]}
    return out


if __name__ == "__main__":
    _child(*(int(a) for a in sys.argv[1:5]))
