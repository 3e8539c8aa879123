"""Artifacts: writing the converted-model directory (``model.safetensors`` +
``symconvert.json``, and ``plan.json`` when a plan is given). ``load`` is
``symconvert.io.loading``.

The file holds the packed free parameters and the untouched tensors, nothing else: no
pickle, no dense copy. The metadata (also inside the safetensors header) records how to
rebuild the architecture and which tensors are symmetric, so ``load`` needs only
symconvert and timm/torchvision; ``save(model, out, plan=, config=)`` also records how the
model was converted (``convert``, ``calibration``) and which task judges it (``task``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import timm
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from symconvert.checks import require_finite
from symconvert.errors import SymconvertError
from symconvert.io.dtypes import dtype_name, parse_dtype
from symconvert.io.files import (
    META_NAME,
    PLAN_NAME,
    WEIGHTS_NAME,
    atomic_write,
    atomic_write_text,
    check_path_given,
    existing_parent,
    os_error,
    probe_dir,
)
from symconvert.models.sources import model_string
from symconvert.surgery.calibrate import calibration_record
from symconvert.surgery.config import ConvertConfig
from symconvert.surgery.parametrization import converted_tensors
from symconvert.surgery.plan import Plan
from symconvert.tasks import TASK_KEY, task_of
from symconvert.version import __version__

FORMAT_VERSION = 1
META_KEY = "symconvert"


def versions() -> dict[str, str]:
    return {
        "symconvert": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
    }


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of the tensors, in name order."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().contiguous().cpu()
        digest.update(f"{key}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


#: the metadata keys that decide the architecture; the SHA-256 covers them with the tensors
SHAPING_KEYS = ("format_version", "source", "layers", "aliases")


def model_sha256(state: dict[str, torch.Tensor], meta: dict[str, Any]) -> str:
    """SHA-256 over the tensors (``tensors_sha256``) and the model-shaping metadata
    (``SHAPING_KEYS``, canonical JSON): an edited recorded shape or source fails it."""
    shaping = {key: meta.get(key) for key in SHAPING_KEYS}
    digest = hashlib.sha256(tensors_sha256(state).encode())
    digest.update(json.dumps(shaping, sort_keys=True, separators=(",", ":")).encode())
    return digest.hexdigest()


def dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that share storage with an earlier key; return {alias: kept}."""
    kept: dict[tuple, str] = {}
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for key in sorted(state):
        tensor = state[key]
        ident = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride(), tensor.device)
        if tensor.numel() and ident in kept:
            aliases[key] = kept[ident]
            continue
        kept[ident] = key
        out[key] = tensor.detach().contiguous().cpu()
    return out, aliases


def layer_records(model: nn.Module) -> dict[str, dict[str, Any]]:
    """{qualified tensor name: scheme, shape, groups} for every converted tensor; tied
    aliases point at the record they share."""
    records: dict[str, dict[str, Any]] = {}
    owners: dict[int, str] = {}
    for name, module, tensor, sym in converted_tensors(model):
        key = f"{name}.{tensor}" if name else tensor
        plist = module.parametrizations[tensor]
        if id(plist) in owners:
            records[owners[id(plist)]]["aliases"].append(key)
            continue
        owners[id(plist)] = key
        records[key] = {
            "scheme": sym.scheme.spec,
            "shape": list(sym.shape),
            "groups": sym.groups,
            "aliases": [],
        }
    return records


def check_writable(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fail early (before any heavy work) if ``out`` cannot receive a model directory."""
    check_path_given(out)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SymconvertError(f"--out {out} exists and is not a directory.")
    if (out / WEIGHTS_NAME).exists() and not overwrite:
        raise SymconvertError(
            f"{out} already holds a model ({WEIGHTS_NAME}); pass --overwrite or choose another --out."
        )
    parent = out if out.exists() else existing_parent(out)
    if not parent.is_dir():
        raise SymconvertError(f"cannot create a directory under {parent}: it is a file.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SymconvertError(f"cannot write to {out}: {parent} is not writable.")
    probe_dir(parent, out)  # os.access says yes to root on a read-only mount
    return out


def convert_record(model: nn.Module, config: ConvertConfig, plan: Plan | None = None
                   ) -> dict[str, Any]:
    """What a converted directory records under ``convert``: the source model (as a MODEL
    string and its arguments) and the ``ConvertConfig`` (``to_record``); with
    ``scheme="auto"`` the candidate schemes the plan weighed."""
    source = getattr(model, "symconvert_source", None) or {}
    record = {"model": model_string(source) if source else None,
              "pretrained": bool(source.get("pretrained")), "weights": source.get("weights"),
              "num_classes": source.get("num_classes"),
              "model_kwargs": dict(source.get("kwargs") or {}), **config.to_record()}
    if getattr(plan, "schemes", None) is not None:
        record["schemes"] = plan.schemes
    return record


def write_plan(out: str | os.PathLike, plan: Plan) -> Path:
    """``out/plan.json``: the plan as ``inspect --format json`` prints it."""
    return atomic_write_text(Path(out) / PLAN_NAME, json.dumps(plan.to_dict(), indent=2) + "\n")


def save(
    model: nn.Module,
    out: str | os.PathLike,
    source: dict | None = None,
    extra_metadata: dict | None = None,
    overwrite: bool = True,
    dtype: str | torch.dtype | None = None,
    *,
    plan: Plan | None = None,
    config: ConvertConfig | None = None,
) -> Path:
    """Write ``out/model.safetensors`` and ``out/symconvert.json`` atomically; with ``plan``
    (what ``convert`` returned) also ``out/plan.json``.

    The metadata records the source, the converted layers, the storage ``dtype`` (float32
    default, bfloat16, float16; ``load`` reads any back into the float32 model), the
    versions, the model's ``task``, and: with ``config`` (the ``ConvertConfig``) how it was
    converted (``convert``), with a calibrated ``plan`` the calibration (``calibration``),
    and whatever ``extra_metadata`` adds (``finetune``, ``parent``, ...).

    ``source`` is needed only when the model did not come from ``create_model``
    (which records it as ``model.symconvert_source``).
    """
    source = source or getattr(model, "symconvert_source", None)
    if not source:
        raise SymconvertError(
            "cannot save: the model does not say how to rebuild its architecture. Build it "
            "with symconvert.create_model(...) or pass source={'library': 'timm'|'torchvision'|"
            "'py', 'name': ..., 'num_classes': ..., 'kwargs': {...}}."
        )
    out = check_writable(out, overwrite=overwrite)
    storage = parse_dtype(dtype)
    require_finite(model, f"the model directory {out}")
    state, aliases = dedupe(model.state_dict())
    state = {k: v.to(storage) if v.is_floating_point() else v for k, v in state.items()}
    meta = _metadata(model, source, extra_metadata, plan, config)
    meta.update({"layers": layer_records(model), "aliases": aliases,
                 "dtype": dtype_name(storage)})
    meta["sha256"] = model_sha256(state, meta)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(exc, out) from None
    header = {META_KEY: json.dumps(meta, sort_keys=True)}
    atomic_write(out / WEIGHTS_NAME, lambda path: save_file(state, str(path), metadata=header))
    atomic_write_text(out / META_NAME, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    if plan is not None:
        write_plan(out, plan)
    model.symconvert_metadata = meta
    return out


def _metadata(model: nn.Module, source: dict, extra: dict | None, plan: Plan | None,
              config: ConvertConfig | None) -> dict[str, Any]:
    """The metadata keys besides the tensors' (``layers``, ``aliases``, ``dtype``, ``sha256``)."""
    meta: dict[str, Any] = copy.deepcopy(getattr(model, "symconvert_metadata", None) or {})
    if config is not None:
        meta["convert"] = convert_record(model, config, plan)
    if plan is not None and plan.calibration:
        meta["calibration"] = calibration_record(plan)
    meta.update(copy.deepcopy(extra or {}))
    meta[TASK_KEY] = task_of(model, meta).name
    meta.update({"format_version": FORMAT_VERSION,
                 "source": {**source, "pretrained": bool(source.get("pretrained"))},
                 "versions": versions()})
    return meta


__all__ = ["FORMAT_VERSION", "META_KEY", "META_NAME", "PLAN_NAME", "WEIGHTS_NAME",
           "check_writable", "convert_record", "dedupe", "layer_records", "model_sha256",
           "save", "tensors_sha256", "versions", "write_plan"]
