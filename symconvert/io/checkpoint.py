"""Artifacts: the converted-model directory (``model.safetensors`` + ``symconvert.json``).

The file holds the packed free parameters and the untouched tensors, nothing else: no
pickle, no dense copy. The metadata (also inside the safetensors header) records how to
rebuild the architecture and which tensors are symmetric, so ``load`` needs only
symconvert and timm/torchvision.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from symconvert.errors import CheckpointError, SymconvertError
from symconvert.io.files import atomic_write, os_error
from symconvert.surgery.parametrization import converted_tensors

FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
META_NAME = "symconvert.json"
META_KEY = "symconvert"


def versions() -> dict[str, str]:
    import timm
    import torchvision

    from symconvert import __version__

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


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
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
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SymconvertError(f"--out {out} exists and is not a directory.")
    if (out / WEIGHTS_NAME).exists() and not overwrite:
        raise SymconvertError(
            f"{out} already holds a model ({WEIGHTS_NAME}); pass --overwrite or choose another --out."
        )
    parent = out if out.exists() else _existing_parent(out)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SymconvertError(f"cannot write to {out}: {parent} is not writable.")
    from symconvert.io.files import _probe_dir

    _probe_dir(parent, out)  # os.access says yes to root on a read-only mount
    return out


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    if not path.is_dir():
        raise SymconvertError(f"cannot create a directory under {path}: it is a file.")
    return path


def save(
    model: nn.Module,
    out: str | os.PathLike,
    source: dict | None = None,
    extra_metadata: dict | None = None,
    overwrite: bool = True,
    dtype: str | torch.dtype | None = None,
) -> Path:
    """Write ``out/model.safetensors`` and ``out/symconvert.json`` atomically.

    ``dtype`` (float32 default, bfloat16, float16) is the storage precision of the
    floating tensors, recorded as metadata ``"dtype"``; ``load`` reads any of them back
    into the float32 model.

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
    from symconvert.io.export_packed import dtype_name, parse_dtype

    storage = parse_dtype(dtype)
    from symconvert.checks import require_finite

    require_finite(model, f"the model directory {out}")
    state, aliases = _dedupe(model.state_dict())
    state = {k: v.to(storage) if v.is_floating_point() else v for k, v in state.items()}
    meta: dict[str, Any] = {}
    meta.update(copy.deepcopy(getattr(model, "symconvert_metadata", None) or {}))
    meta.update(copy.deepcopy(extra_metadata or {}))
    meta.update(
        {
            "format_version": FORMAT_VERSION,
            "source": {**source, "pretrained": bool(source.get("pretrained"))},
            "layers": layer_records(model),
            "aliases": aliases,
            "dtype": dtype_name(storage),
            "versions": versions(),
        }
    )
    meta["sha256"] = model_sha256(state, meta)
    from safetensors.torch import save_file

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(exc, out) from None
    header = {META_KEY: json.dumps(meta, sort_keys=True)}
    atomic_write(out / WEIGHTS_NAME, lambda path: save_file(state, str(path), metadata=header))
    atomic_write(out / META_NAME, lambda path: Path(path).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n"))
    model.symconvert_metadata = meta
    return out


#: kept for callers written before symconvert.io.files existed
_atomic_write = atomic_write


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a converted-model directory (or of its ``model.safetensors``)."""
    path = Path(path)
    directory = path.parent if path.is_file() else path
    weights = directory / WEIGHTS_NAME
    if not directory.is_dir() or not weights.is_file():
        raise CheckpointError(
            f"{directory} is not a symconvert model directory: expected {weights} "
            f"(written by `symconvert convert`)."
        )
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt") as fh:
            header = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights} is corrupt or truncated: {exc}") from None
    raw = header.get(META_KEY)
    if raw is None and (directory / META_NAME).is_file():
        raw = (directory / META_NAME).read_text()
    if raw is None:
        raise CheckpointError(f"{weights} carries no symconvert metadata; was it written by symconvert?")
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"the symconvert metadata of {weights} is not valid JSON: {exc}") from None
    if isinstance(meta, dict) and meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{weights} has format version {meta.get('format_version')!r}; this symconvert "
            f"reads version {FORMAT_VERSION}. Upgrade symconvert."
        )
    from symconvert.io.metadata import validate

    return validate(meta, str(directory))


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu",
         trust_code: bool | None = None) -> nn.Module:
    """Rebuild a converted (or fine-tuned) model from its directory.

    The metadata is validated (``symconvert.io.metadata``) before anything is built; a
    recorded ``py:`` source is refused unless ``trust_code=True`` (default: the CLI's
    ``--trust-code``, else False), since rebuilding it imports and calls the named code.
    The architecture comes from the recorded source (random init), the symmetric layers
    are re-attached from the recorded schemes, then the tensors are loaded strictly and
    checked against the recorded SHA-256 (which also covers the model-shaping metadata).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from symconvert.io.metadata import check_trusted
    from symconvert.models.sources import with_module_versions

    path = Path(path)
    directory = path.parent if path.is_file() else path
    meta = read_metadata(directory)
    check_trusted(meta, trust_code, str(directory))
    try:
        state = load_file(str(directory / WEIGHTS_NAME), device=str(map_location))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{directory / WEIGHTS_NAME} is corrupt or truncated: {exc}") from None
    if model_sha256(state, meta) != meta.get("sha256"):
        raise CheckpointError(
            f"{directory / WEIGHTS_NAME} does not match its recorded SHA-256: the tensors or "
            "the metadata that shapes the model were changed or damaged after it was written."
        )
    _check_packed_shapes(directory, meta, state)
    model = _build_bounded(directory, meta, state)
    _attach_layers(directory, model, meta)
    for alias, kept in meta.get("aliases", {}).items():
        if kept not in state:
            raise CheckpointError(f"{directory}: alias {alias!r} points at {kept!r}, which the "
                                  "file does not hold.")
        state[alias] = state[kept]
    try:
        model.load_state_dict(with_module_versions(model, state), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{directory} does not fit the architecture it records ({meta['source'].get('name')}): "
            f"{str(exc).splitlines()[0]}"
        ) from None
    model.to(map_location)
    model.symconvert_metadata = meta
    model.symconvert_source = meta["source"]
    return model



def _packed_key(key: str) -> str:
    module_name, _, tensor = key.rpartition(".")
    return f"{module_name}.parametrizations.{tensor}.original" if module_name else \
        f"parametrizations.{tensor}.original"


def _check_packed_shapes(directory: Path, meta: dict[str, Any], state: dict) -> None:
    """Every recorded layer's packed tensor is in the file with the size its scheme gives
    the recorded shape (computed on the meta device: nothing is allocated)."""
    from symconvert.schemes import get_scheme

    aliases = meta.get("aliases", {})
    for key, record in meta.get("layers", {}).items():
        name = _packed_key(key)
        packed = state.get(name, state.get(aliases.get(name, "")))  # tied: stored once
        if packed is None:
            raise CheckpointError(f"{directory}: layer {key!r} is recorded as converted but the "
                                  "file holds no packed tensor for it.")
        scheme = get_scheme(record["scheme"])
        try:
            want = scheme.pack(torch.empty(record["shape"], device="meta"),
                               record.get("groups", 1)).shape
        except Exception as exc:  # a recorded shape the scheme cannot pack
            raise CheckpointError(f"{directory}: layer {key!r}: scheme {record['scheme']} "
                                  f"cannot pack shape {record['shape']} ({exc}).") from None
        if tuple(want) != tuple(packed.shape):
            raise CheckpointError(
                f"{directory}: layer {key!r} records shape {record['shape']} ({record['scheme']}: "
                f"{list(want)} packed) but the file holds {list(packed.shape)}.")


#: a model may hold this many times the elements its file describes (dense layers
#: unpacked) before ``load`` refuses to allocate it
_EXPANSION = 4


def _build_bounded(directory: Path, meta: dict[str, Any], state: dict) -> nn.Module:
    """The recorded architecture, after a meta-device build showed it is of the size the
    file describes (recorded kwargs cannot make ``load`` allocate 80 GB)."""
    import math

    from symconvert.models.sources import create_model_from_source

    source = meta["source"]
    described = sum(t.numel() for t in state.values()) + sum(
        math.prod(r["shape"]) for r in meta.get("layers", {}).values())
    size = 0
    # A registered name with its default arguments has the size its library gives it; only
    # recorded kwargs / num_classes can inflate it, so only then pay for the meta build
    # (resnet101: about half a real build).
    if source.get("kwargs") or source.get("num_classes") is not None:
        try:
            with torch.device("meta"):
                skeleton = create_model_from_source(source, pretrained=False)
            size = sum(t.numel() for t in skeleton.state_dict().values())
        except SymconvertError as exc:
            raise CheckpointError(f"{directory}: cannot rebuild the recorded architecture: "
                                  f"{exc}") from None
        except Exception:  # a model that cannot be built on the meta device: no bound
            size = 0
    if size > _EXPANSION * described + 1_000_000:
        raise CheckpointError(
            f"{directory}: the recorded source ({source['library']}:{source['name']}, kwargs "
            f"{source.get('kwargs')}) builds a model of {size:,} elements, far more than the "
            f"{described:,} the file describes; refusing to allocate it.")
    try:
        return create_model_from_source(source, pretrained=False)
    except SymconvertError as exc:
        raise CheckpointError(f"{directory}: cannot rebuild the recorded architecture: {exc}") from None
    except (TypeError, ValueError, MemoryError) as exc:
        raise CheckpointError(f"{directory}: the recorded source does not build "
                              f"({type(exc).__name__}: {exc}).") from None


def _attach_layers(directory: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    from symconvert.surgery.convert import attach

    for key, record in meta.get("layers", {}).items():
        module_name, _, tensor = key.rpartition(".")
        try:
            module = model.get_submodule(module_name)
            current = getattr(module, tensor)
        except AttributeError:
            raise CheckpointError(f"{directory}: layer {key!r} does not exist in the recorded "
                                  f"architecture {meta['source']['name']}.") from None
        if not isinstance(current, torch.Tensor) or tuple(current.shape) != tuple(record["shape"]):
            got = list(current.shape) if isinstance(current, torch.Tensor) else type(current).__name__
            raise CheckpointError(f"{directory}: layer {key!r} records shape {record['shape']} but "
                                  f"the architecture has {got}.")
        try:
            attach(model, module_name, tensor, record["scheme"], tuple(record["shape"]),
                   record.get("groups", 1), aliases=record.get("aliases", []), pack=False)
        except (AttributeError, KeyError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{directory}: cannot re-attach {key!r}: {exc}") from None
