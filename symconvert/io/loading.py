"""Opening a model directory: ``read_metadata`` (validated, the trust boundary of
``symconvert.io.metadata``) and ``load`` (the model rebuilt from its recorded source, the
symmetric layers re-attached, the tensors checked against the recorded SHA-256)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from symconvert.errors import CheckpointError, SymconvertError
from symconvert.io.checkpoint import FORMAT_VERSION, META_KEY, model_sha256
from symconvert.io.files import META_NAME, WEIGHTS_NAME
from symconvert.io.metadata import check_trusted, validate
from symconvert.models.sources import create_model_from_source, with_module_versions
from symconvert.schemes import get_scheme
from symconvert.surgery.convert import attach, split_alias


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
    source = meta["source"]
    described = sum(t.numel() for t in state.values()) + sum(
        math.prod(r["shape"]) for r in meta.get("layers", {}).values())
    size = 0
    # A registered name with its default arguments has the size its library gives it; only
    # recorded kwargs / num_classes can inflate it, so only then pay for the meta build
    # (resnet101: about half a real build).
    if source.get("kwargs") or source.get("num_classes") is not None or \
            source.get("library") == "hf":  # a recorded transformers config sizes the model
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


def _tensor_at(model: nn.Module, module_name: str, tensor: str, alias: str | None = None) -> Any:
    """The tensor a recorded layer (or its tied ``alias``) names, None when there is none."""
    try:
        if alias is not None:
            return getattr(*split_alias(model, alias, tensor))
        return getattr(model.get_submodule(module_name), tensor)
    except AttributeError:
        return None


def _check_layers(directory: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Every recorded layer and tied alias names a tensor of its recorded shape in the
    rebuilt architecture, and no tensor is recorded twice; checked before anything is
    attached."""
    seen: set[str] = set()
    arch = meta["source"].get("name")
    for key, record in meta.get("layers", {}).items():
        module_name, _, tensor = key.rpartition(".")
        names = [key, *record.get("aliases", [])]
        for name in names:
            found = _tensor_at(model, module_name, tensor, None if name == key else name)
            if not isinstance(found, torch.Tensor) or list(found.shape) != record["shape"]:
                got = list(found.shape) if isinstance(found, torch.Tensor) else "no such tensor"
                what = "" if name == key else f" and the tied alias {name!r}"
                raise CheckpointError(
                    f"{directory}: layer {key!r} records shape {record['shape']}{what}, but "
                    f"the recorded architecture {arch} has {got} at {name!r}. The metadata "
                    "was edited, or belongs to another model.")
            if name in seen:
                raise CheckpointError(f"{directory}: {name!r} is recorded twice (as a layer or "
                                      "a tied alias). The metadata was edited.")
            seen.add(name)


def _attach_layers(directory: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    _check_layers(directory, model, meta)
    for key, record in meta.get("layers", {}).items():
        module_name, _, tensor = key.rpartition(".")
        try:
            attach(model, module_name, tensor, record["scheme"], tuple(record["shape"]),
                   record.get("groups", 1), aliases=record.get("aliases", []), pack=False)
        except (AttributeError, KeyError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{directory}: cannot re-attach {key!r}: {exc}") from None


__all__ = ["load", "read_metadata"]
