"""The report's per-layer table: one entry per converted tensor, from the ``plan.json`` that
``convert`` wrote (in the directory or its parent), else recomputed on the source weights."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from symconvert.errors import SymconvertError
from symconvert.io.files import PLAN_NAME
from symconvert.report.sources import SourceCache
from symconvert.schemes import get_scheme
from symconvert.surgery.plan import symmetrization_error


def layer_table(directory: Path, meta: dict[str, Any], parent: Path | None,
                sources: SourceCache) -> tuple[list[dict[str, Any]], str]:
    """One entry per converted tensor of ``directory``: from the ``plan.json`` that
    ``convert`` wrote (in DIR or its parent), else recomputed on the source weights."""
    records = meta.get("layers") or {}
    for where in (directory, parent):
        if where is None or not (where / PLAN_NAME).is_file():
            continue
        try:
            plan = json.loads((where / PLAN_NAME).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        by_key = {}
        for entry in plan.get("layers", []):
            if entry.get("action") == "convert":
                by_key[f"{entry['module']}.{entry['tensor']}"] = entry
        # plan.json must describe exactly the tensors this directory holds
        if set(by_key) == set(records) and all(
                by_key[k]["scheme"] == r["scheme"] and list(by_key[k]["shape"]) == r["shape"]
                for k, r in records.items()):
            return [_layer_entry(by_key[k]) for k in records], str(where / PLAN_NAME)
    layers = _recompute_layers(records, sources)
    if any(e["symmetrization_error"] is None for e in layers):
        return layers, "recomputed from the metadata (no source weights: no error)"
    return layers, "recomputed on the source weights"


def _layer_entry(entry: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": entry.get("name") or _display_name(f"{entry['module']}.{entry['tensor']}"),
        "shape": list(entry["shape"]),
        "scheme": entry["scheme"],
        "groups": int(entry.get("groups", 1)),
        "params_before": int(entry["params_before"]),
        "params_after": int(entry["params_after"]),
        "symmetrization_error": entry.get("symmetrization_error"),
        "aliases": list(entry.get("aliases") or []),
        # relative output error on the calibration data (convert --calibrate), else None
        "output_error": entry.get("output_error"),
        "output_error_naive": entry.get("output_error_naive"),
    }


def _display_name(key: str) -> str:
    module, _, tensor = key.rpartition(".")
    return module if tensor == "weight" else key


def _recompute_layers(records: dict[str, Any], sources: SourceCache) -> list[dict[str, Any]]:
    source_model = None
    if sources.has_weights:
        try:
            source_model = sources.weighted()
        except SymconvertError:  # offline without cached weights: counts only, no error
            source_model = None
    out = []
    for key, record in records.items():
        scheme = get_scheme(record["scheme"])
        shape = tuple(record["shape"])
        groups = int(record.get("groups", 1))
        error = None
        if source_model is not None:
            module_name, _, tensor = key.rpartition(".")
            weight = getattr(source_model.get_submodule(module_name), tensor)
            error = symmetrization_error(scheme, weight.reshape(shape), groups)
        out.append({
            "name": _display_name(key), "shape": list(shape), "scheme": scheme.spec,
            "groups": groups, "params_before": math.prod(shape),
            "params_after": scheme.free_count(shape, groups),
            "symmetrization_error": error, "aliases": list(record.get("aliases") or []),
            "output_error": None, "output_error_naive": None,
        })
    return out


__all__ = ["layer_table"]
