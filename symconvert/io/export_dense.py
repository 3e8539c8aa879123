"""``--format dense``: the folded model's state_dict as safetensors, loadable strictly by the
source architecture (plain timm/torchvision). An ``hf:`` model is written as a transformers
directory instead (``export_hf``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from symconvert.io.checkpoint import dedupe
from symconvert.io.export import ExportFormat, register_export
from symconvert.io.export_hf import write_transformers_dir
from symconvert.models.hf import is_hf
from symconvert.surgery.convert import fold


@register_export
class DenseExport(ExportFormat):
    name = "dense"
    help = "safetensors state_dict of the source architecture"
    label = "safetensors, dense"

    def writes_directory(self, model: nn.Module) -> bool:
        return is_hf(model)

    def write(self, model: nn.Module, path: Path, *, packed: bool,
              dtype: torch.dtype) -> dict[str, Any]:
        if is_hf(model):
            write_transformers_dir(model, path, dtype)
            return {"index_bytes": 0, "tables": 0, "layers": 0}
        model = fold(model).eval()
        state, aliases = dedupe(model.state_dict())
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        meta = {
            "source": json.dumps(getattr(model, "symconvert_source", None) or {}),
            "aliases": json.dumps(aliases),
            "format": "dense (symconvert export: folded, loads into the source architecture)",
        }
        save_file(state, str(path), metadata=meta)
        return {"index_bytes": 0, "tables": 0, "layers": 0}
