"""``--format torchscript``: the folded model (dense), or with ``--packed`` the free
parameters and in-graph unpacking, traced on the task's example input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from symconvert.io.export import ExportFormat, register_export
from symconvert.io.export_packed import prepare
from symconvert.tasks import task_of


@register_export
class TorchScriptExport(ExportFormat):
    name = "torchscript"
    help = "traced TorchScript (torch.jit.load)"
    label = "TorchScript"
    packable = deployable = True  # --packed applies; the report measures both files

    def write(self, model: nn.Module, path: Path, *, packed: bool,
              dtype: torch.dtype) -> dict[str, Any]:
        info = prepare(model, packed, dtype)
        example = task_of(model).example_inputs(model)
        with torch.no_grad():
            traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(path))
        return info


__all__ = ["TorchScriptExport"]
