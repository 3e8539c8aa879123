"""Block-output distillation for ``finetune`` (``--distill-features W``): besides the logit
KD term, the student's block outputs (the blocks block-wise calibration refines: residual
blocks, transformer layers) are pulled towards the teacher's on the same batch, as
intermediate-feature KD does (FitNets; BRECQ's block reconstruction carried into training).
The term is W × the mean over blocks of ‖s − t‖² / ‖t‖²."""

from __future__ import annotations

import torch
from torch import nn

from symconvert.surgery.calib_blocks import find_blocks, first_tensor
from symconvert.surgery.calib_moments import find_units


class BlockDistill:
    """Forward hooks on the student's converted blocks and the teacher's same-named modules;
    ``loss()`` after a step's forward passes gives the weighted term and clears them."""

    def __init__(self, student: nn.Module, teacher: nn.Module, weight: float) -> None:
        self.weight = weight
        teacher_modules = dict(teacher.named_modules())
        self.names = [b.name for b in find_blocks(student, find_units(student))
                      if b.name in teacher_modules]
        student_modules = dict(student.named_modules())
        self.got: dict[tuple[str, str], torch.Tensor] = {}
        self.handles = []
        for name in self.names:
            for side, module in (("s", student_modules[name]), ("t", teacher_modules[name])):
                self.handles.append(module.register_forward_hook(self._hook(side, name)))

    def _hook(self, side: str, name: str):
        def hook(module, args, out):
            self.got[(side, name)] = first_tensor(out)
        return hook

    def loss(self) -> torch.Tensor | None:
        terms = []
        for name in self.names:
            s, t = self.got.get(("s", name)), self.got.get(("t", name))
            if s is None or t is None or s.shape != t.shape:
                continue
            t = t.detach().float()
            terms.append((s.float() - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12))
        self.got.clear()
        if not terms:
            return None
        return self.weight * torch.stack(terms).mean()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


__all__ = ["BlockDistill"]
