"""The report's ``deployment`` entry: bytes of what you ship in every deployable export
format (``ExportFormat.deployable``), dense and packed, written and measured."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from symconvert.errors import SymconvertError
from symconvert.io.dtypes import dtype_name, parse_dtype
from symconvert.io.export import EXPORTS, export
from symconvert.io.export_packed import deployment_bytes
from symconvert.io.files import WEIGHTS_NAME
from symconvert.io.loading import load, read_metadata


def deployable_keys() -> list[tuple[str, str, bool]]:
    """``(key, format, packed)`` of every file the report writes: ``dense_onnx``,
    ``packed_onnx``, ... in registry order."""
    return [(f"{'packed' if packed else 'dense'}_{name}", name, packed)
            for name, fmt in EXPORTS.items() if fmt.deployable for packed in (False, True)]


def measure_deployment(directory: str | os.PathLike) -> dict[str, Any]:
    """Bytes of every deployable format, written to a temporary directory and measured
    (float32), plus the tensor bytes per storage dtype (``by_dtype``, computed: dtype size ×
    tensors, + index tables for packed). A format that cannot be written is absent, with
    its reason in ``reasons``."""
    directory = Path(directory)
    computed = deployment_bytes(load(directory))
    out: dict[str, Any] = {"symconvert": (directory / WEIGHTS_NAME).stat().st_size}
    reasons: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="symconvert-deploy-") as tmp:
        for key, fmt, packed in deployable_keys():
            try:
                out[key] = export(load(directory), fmt, Path(tmp) / key,
                                  packed=packed).stat().st_size
            except Exception as exc:  # noqa: BLE001  (a measurement: report why it is missing)
                reasons[key] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    try:
        stored = dtype_name(parse_dtype(read_metadata(directory).get("dtype")))
    except SymconvertError:
        stored = "float32"
    out.update({"index_bytes": computed["index_bytes"], "stored_dtype": stored,
                "by_dtype": computed["by_dtype"]})
    if reasons:
        out["reasons"] = reasons
    return out


__all__ = ["deployable_keys", "measure_deployment"]
