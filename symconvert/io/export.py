"""Export: fold the symmetry back into the ORIGINAL architecture and write it as dense
safetensors, ONNX or TorchScript."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from symconvert.errors import SymconvertError
from symconvert.io.checkpoint import _dedupe
from symconvert.io.files import atomic_write as _atomic_write
from symconvert.io.files import check_output_file
from symconvert.surgery.convert import fold

FORMATS = ("dense", "onnx", "torchscript")


def example_input(model: nn.Module, batch_size: int = 1) -> torch.Tensor:
    """A zero input of the size the model's pretrained config expects."""
    from timm.data import resolve_data_config

    from symconvert.tasks.data import model_in_chans

    cfg = resolve_data_config(model=model)
    channels, *spatial = cfg["input_size"]
    # a model built with another in_chans than its pretrained config says (in_chans=1)
    channels = model_in_chans(model, getattr(model, "pretrained_cfg", None)) or channels
    return torch.zeros(batch_size, channels, *spatial)


def export(model: nn.Module, fmt: str, out: str | os.PathLike, overwrite: bool = False,
           packed: bool = False, dtype: str | torch.dtype | None = None) -> Path:
    """Fold ``model`` (in place) and write it to ``out`` in ``fmt``. ``packed`` (onnx,
    torchscript) keeps the free parameters and unpacks in the graph; ``dtype`` is the
    storage precision (see ``symconvert.io.export_packed``)."""
    from symconvert.io.export_packed import export_model, parse_dtype

    if fmt not in FORMATS:
        raise SymconvertError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}.")
    if packed and fmt == "dense":
        raise SymconvertError("--packed applies to --format onnx or torchscript (a dense "
                              "safetensors export is the folded state_dict; the packed one "
                              "is the model directory itself).")
    storage = parse_dtype(dtype)
    out = Path(out)
    if out.exists() and not overwrite:
        raise SymconvertError(f"{out} exists; pass --overwrite or choose another --out.")
    if not out.absolute().parent.exists():
        try:
            out.absolute().parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            from symconvert.io.files import os_error

            raise os_error(exc, out) from None
    check_output_file(out, overwrite=True)  # only "can a file be written there"
    if fmt != "dense":
        return export_model(model, fmt, out, packed=packed, dtype=storage)["path"]
    model = fold(model).eval()
    if fmt == "dense":  # the only format left here
        from safetensors.torch import save_file

        state, aliases = _dedupe(model.state_dict())
        state = {k: v.to(storage) if v.is_floating_point() else v for k, v in state.items()}
        meta = {
            "source": json.dumps(getattr(model, "symconvert_source", None) or {}),
            "aliases": json.dumps(aliases),
            "format": "dense (symconvert export: folded, loads into the source architecture)",
        }
        _atomic_write(out, lambda path: save_file(state, str(path), metadata=meta))
    return out
