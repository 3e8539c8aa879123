"""The sign gauge calibration chooses before its fits (issue 18).

A conv whose output goes straight into a BatchNorm may flip the sign of any output channel:
with the norm's running mean and scale flipped too, the network computes exactly the same
function. ``channel`` symmetry cannot tell such a flip from a change of the weight, so the
signs decide how far a trained square weight is from its nearest symmetric one. Before
calibrating, each such conv of the source gets the signs s maximising sᵀBs, B_oi = Σ_taps
W_oi W_io (the sign of the top eigenvector of B scaled by the rows' norms, then single flips
while one helps), in a copy of the source that calibration then reproduces; the converted
model gets the same flips. On the real CIFAR ResNets (one epoch of JPEG train afterwards,
one seed) this ended 0.5 pt (ResNet-44) and 0.3 pt (ResNet-32) higher than without.

A flip is only kept when one forward of the flipped copy gives the source's output (a conv
output that is also used elsewhere than by its norm would change it): otherwise no sign is
changed.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from symconvert.surgery.calib_moments import Unit, packed_of, run_model

#: the flipped copy must reproduce the source's output to this relative error
TOLERANCE = 1e-4


def best_signs(weight: torch.Tensor) -> torch.Tensor:
    """±1 per output channel of a square ``weight`` [n, n, ...] maximising sᵀBs."""
    w = weight.detach().double().flatten(2) if weight.dim() > 2 else weight.detach().double()[..., None]
    b = (w * w.transpose(0, 1)).sum(-1)
    scale = w.pow(2).sum((1, 2)).clamp_min(1e-300).rsqrt()
    vec = torch.linalg.eigh(scale[:, None] * b * scale[None, :])[1][:, -1]
    s = torch.where(vec < 0, -1.0, 1.0).to(b.dtype)
    for _ in range(4 * len(s)):
        gain = -4 * s * (b @ s) + 4 * b.diagonal()  # the change of sᵀBs when s_k flips
        k = int(gain.argmax())
        if gain[k] <= 1e-12 * float(b.diagonal().sum()):
            break
        s[k] = -s[k]
    return s.to(weight.dtype)


def _pairs(model: nn.Module, units: list[Unit], x: torch.Tensor, device) -> list[tuple[Unit, str]]:
    """(unit, norm name) for the square ``channel`` convs whose output is a BatchNorm's input."""
    candidates = {u.sites[0]: u for u in units
                  if u.sym.scheme.name == "channel" and u.tensor == "weight" and len(u.sites) == 1
                  and isinstance(u.module, nn.modules.conv._ConvNd) and u.module.groups == 1
                  and u.module.in_channels == u.module.out_channels}
    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # the tensors kept: ids stay unique
    found: dict[str, str] = {}
    handles = []
    for name, module in model.named_modules():
        if name in candidates:
            def made(m, args, out, _n=name) -> None:
                outputs[id(out)] = (_n, out)
            handles.append(module.register_forward_hook(made))
        elif (isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine
              and module.track_running_stats):
            def feeds(m, args, _n=name) -> None:  # a pre-hook's return value would replace args
                found.setdefault(outputs.get(id(args[0]), ("",))[0], _n)
            handles.append(module.register_forward_pre_hook(feeds))
    try:
        run_model(model, x, device)
    finally:
        for h in handles:
            h.remove()
    return [(candidates[c], n) for c, n in found.items() if c in candidates]


def _flip(norm: nn.Module, s: torch.Tensor, weight: torch.Tensor | None = None) -> None:
    """Flip the channels ``s`` < 0 of a norm's running mean and scale (and of ``weight``)."""
    with torch.no_grad():
        if weight is not None:
            weight.mul_(s.view((-1,) + (1,) * (weight.dim() - 1)))
        norm.running_mean.mul_(s)
        norm.weight.mul_(s)


def sign_gauge(model: nn.Module, source_model: nn.Module, units: list[Unit], x: torch.Tensor,
               device) -> tuple[nn.Module, dict[str, Any]]:
    """(the source to calibrate against, record). The source is a flipped copy when some conv
    was flipped and the copy reproduces ``source_model`` on ``x``; ``model`` then gets the
    same flips (its norms, and its packed weights re-packed from the flipped source weights).
    ``source_model`` is never changed."""
    pairs = _pairs(model, units, x[:2], device)
    if not pairs:
        return source_model, {"flipped_layers": 0, "flipped_channels": 0}
    gauged = copy.deepcopy(source_model)
    mods = dict(gauged.named_modules())
    signs = {}
    for unit, norm in pairs:
        conv = mods[unit.sites[0]]
        signs[unit.name] = s = best_signs(conv.weight)
        _flip(mods[norm], s, conv.weight)
    with torch.no_grad():
        ref, out = source_model(x.to(device)), gauged(x.to(device))
    ref, out = (t[0] if isinstance(t, (tuple, list)) else t for t in (ref, out))
    if not (torch.is_tensor(ref) and float((out - ref).norm()) <= TOLERANCE * float(ref.norm())):
        return source_model, {"flipped_layers": 0, "flipped_channels": 0,
                              "note": "flips changed the output: not used"}
    converted = dict(model.named_modules())
    for unit, norm in pairs:
        _flip(converted[norm], signs[unit.name])
        with torch.no_grad():
            packed_of(unit).copy_(unit.sym.scheme.pack(mods[unit.sites[0]].weight.detach(), unit.sym.groups))
    return gauged, {"flipped_layers": sum(int((s < 0).any()) for s in signs.values()),
                    "flipped_channels": sum(int((s < 0).sum()) for s in signs.values())}


__all__ = ["best_signs", "sign_gauge", "TOLERANCE"]
