"""Export: fold the symmetry back into the ORIGINAL architecture (or keep it packed) and
write one file in a registered format.

    export(model, "onnx", "r18.onnx", packed=True, dtype="float16")

A format is one ``ExportFormat`` subclass in its own module, decorated with
``@register_export`` and imported (one line) by ``symconvert/io/__init__.py``:
``export_dense`` (safetensors state_dict of the source architecture), ``export_onnx``,
``export_torchscript``. The CLI's ``--format`` choices, the report's ``deployment`` table
and ``ExportOptions`` all read this registry.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from symconvert.checks import require_finite
from symconvert.errors import SymconvertError
from symconvert.io.dtypes import DTYPE_NAMES, dtype_name, parse_dtype
from symconvert.io.files import (
    atomic_directory,
    atomic_write,
    check_output_file,
    check_path_given,
    os_error,
)
from symconvert.options import Options, option


class ExportFormat:
    """One export format. ``write`` writes ``model`` (a converted model, changed in place)
    to the path it is given (a temporary file the caller renames into place) and returns
    the in-graph unpacking accounting (``{"index_bytes", "tables", "layers"}``, zeros when
    nothing is packed)."""

    name: ClassVar[str]
    #: a few words for ``--help`` and the report
    help: ClassVar[str] = ""
    label: ClassVar[str] = ""
    #: ``--packed`` applies (the file keeps the free parameters and unpacks in the graph)
    packable: ClassVar[bool] = False
    #: the report measures its dense and packed files (``deployment``)
    deployable: ClassVar[bool] = False

    def write(self, model: nn.Module, path: Path, *, packed: bool,
              dtype: torch.dtype) -> dict[str, Any]:
        raise NotImplementedError

    def writes_directory(self, model: nn.Module) -> bool:
        """Whether ``write`` makes a directory of ``model`` (a transformers model's dense
        export); then ``write`` gets an empty temporary directory."""
        return False


EXPORTS: dict[str, ExportFormat] = {}


def register_export(cls: type[ExportFormat]) -> type[ExportFormat]:
    """Class decorator: make ``cls.name`` an export format (``--format NAME``)."""
    if cls.name in EXPORTS:
        raise ValueError(f"export format {cls.name!r} registered twice")
    EXPORTS[cls.name] = cls()
    return cls


def export_names() -> list[str]:
    return list(EXPORTS)


def get_export(name: str) -> ExportFormat:
    try:
        return EXPORTS[name]
    except KeyError:
        raise SymconvertError(f"unknown export format {name!r}; choose from "
                              f"{', '.join(EXPORTS)}.") from None


@dataclass
class ExportOptions(Options):
    """The options of ``symconvert export`` (and of ``export``)."""

    format: str = option("dense", "Export format (dense: a safetensors state_dict of the "
                         "source architecture).", choices=export_names)
    packed: bool = option(False, "onnx/torchscript: store only the free parameters and "
                          "rebuild each dense weight in the graph (about the size of the model "
                          "directory; onnxruntime folds it at session creation).")
    dtype: str = option("float32", "Storage precision of the written tensors: float32, "
                        "bfloat16 or float16 (half the bytes; `load` computes in float32). In "
                        "onnx/torchscript the graph casts to float32.", choices=DTYPE_NAMES)

    def __post_init__(self) -> None:
        self.dtype = dtype_name(parse_dtype(self.dtype))
        get_export(self.format)  # an unknown format names the registered ones
        super().__post_init__()
        if self.packed and not EXPORTS[self.format].packable:
            packable = " or ".join(n for n, f in EXPORTS.items() if f.packable)
            raise SymconvertError(
                f"--packed applies to --format {packable} (a dense safetensors export is the "
                "folded state_dict; the packed one is the model directory itself).")


def export(model: nn.Module, fmt: str, out: str | os.PathLike, overwrite: bool = False,
           packed: bool = False, dtype: str | torch.dtype | None = None) -> Path:
    """Write ``model`` (changed in place: folded, or packed for export) to ``out`` in the
    registered format ``fmt``; ``packed`` keeps the free parameters and unpacks in the
    graph; ``dtype`` is the storage precision (see ``symconvert.io.export_packed``)."""
    return export_with_info(model, fmt, out, overwrite=overwrite, packed=packed,
                            dtype=dtype)["path"]


def export_with_info(model: nn.Module, fmt: str, out: str | os.PathLike, *,
                     overwrite: bool = False, packed: bool = False,
                     dtype: str | torch.dtype | None = None) -> dict[str, Any]:
    """``export``, returning ``{"path", "bytes", "index_bytes", "tables", "layers"}``."""
    options = ExportOptions(format=fmt, packed=packed,
                            dtype=dtype_name(parse_dtype(dtype)))
    check_path_given(out)
    require_finite(model, f"the export {out}", "The model holds damaged weights (or the run "
                   "that trained it diverged); export a model directory whose weights are "
                   "finite.")
    out = Path(out)
    if out.exists() and not overwrite:
        raise SymconvertError(f"{out} exists; pass --overwrite or choose another --out.")
    if not out.absolute().parent.exists():
        try:
            out.absolute().parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise os_error(exc, out) from None
    check_output_file(out, overwrite=True)  # only "can a file be written there"
    info: dict[str, Any] = {}
    storage = parse_dtype(options.dtype)

    def write(path: str) -> None:
        info.update(EXPORTS[fmt].write(model, Path(path), packed=packed, dtype=storage))

    if EXPORTS[fmt].writes_directory(model):
        atomic_directory(out, write)
        # the tensors' bytes (a directory also holds its config and tokenizer files)
        return {"path": out, "bytes": sum(p.stat().st_size for p in out.glob("*.safetensors")),
                **info}
    atomic_write(out, write)
    return {"path": out, "bytes": out.stat().st_size, **info}


__all__ = ["EXPORTS", "ExportFormat", "ExportOptions", "export", "export_names",
           "export_with_info", "get_export", "register_export"]
