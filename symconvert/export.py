"""Export: fold the symmetry back into the ORIGINAL architecture and write it as dense
safetensors, ONNX or TorchScript."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from symconvert.checkpoint import _dedupe
from symconvert.errors import SymconvertError
from symconvert.files import atomic_write as _atomic_write
from symconvert.files import check_output_file
from symconvert.surgery import fold

FORMATS = ("dense", "onnx", "torchscript")


def example_input(model: nn.Module, batch_size: int = 1) -> torch.Tensor:
    """A zero input of the size the model's pretrained config expects."""
    from timm.data import resolve_data_config

    from symconvert.data import model_in_chans

    cfg = resolve_data_config(model=model)
    channels, *spatial = cfg["input_size"]
    # a model built with another in_chans than its pretrained config says (in_chans=1)
    channels = model_in_chans(model, getattr(model, "pretrained_cfg", None)) or channels
    return torch.zeros(batch_size, channels, *spatial)


def export(model: nn.Module, fmt: str, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fold ``model`` (in place) and write it to ``out`` in ``fmt``."""
    if fmt not in FORMATS:
        raise SymconvertError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}.")
    out = Path(out)
    if out.exists() and not overwrite:
        raise SymconvertError(f"{out} exists; pass --overwrite or choose another --out.")
    if not out.absolute().parent.exists():
        try:
            out.absolute().parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            from symconvert.files import os_error

            raise os_error(exc, out) from None
    check_output_file(out, overwrite=True)  # only "can a file be written there"
    model = fold(model).eval()
    if fmt == "dense":
        from safetensors.torch import save_file

        state, aliases = _dedupe(model.state_dict())
        meta = {
            "source": json.dumps(getattr(model, "symconvert_source", None) or {}),
            "aliases": json.dumps(aliases),
            "format": "dense (symconvert export: folded, loads into the source architecture)",
        }
        _atomic_write(out, lambda path: save_file(state, str(path), metadata=meta))
    elif fmt == "torchscript":
        with torch.no_grad():
            traced = torch.jit.trace(model, example_input(model), check_trace=False)
        _atomic_write(out, lambda path: torch.jit.save(traced, str(path)))
    else:
        try:
            import onnx  # noqa: F401
        except ImportError:
            raise SymconvertError(
                "ONNX export needs the onnx packages: pip install 'symconvert[onnx]'."
            ) from None
        example = example_input(model)

        def write(path):
            torch.onnx.export(model, (example,), str(path), input_names=["input"],
                              output_names=["output"], dynamo=False,
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})

        _atomic_write(out, write)
    return out
