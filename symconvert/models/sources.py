"""Model in: the MODEL strings of the CLI and ``create_model``.

``timm:NAME`` and ``torchvision:NAME`` name a library explicitly; ``hf-hub:ORG/NAME`` goes
to timm; ``py:package.module:function`` calls a user's factory. A bare ``NAME`` is looked
up in timm first, then torchvision (timm's registry is the larger and also covers
pretrained tags such as ``resnet50.a1_in1k``); the library chosen is reported.
The model remembers where it came from (``model.symconvert_source``) so that ``save``
records it and ``load`` can rebuild the architecture.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import inspect as _inspect
import os
import pickle
import re
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import timm
import torch
import torchvision
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from symconvert.errors import SymconvertError, UnknownModelError, WeightsError
from symconvert.models import hf
from symconvert.surgery.selection import head_names

LIBRARIES = ("timm", "torchvision", "py", "hf")
STRIP_PREFIXES = ("module.", "_orig_mod.")


def parse_model(spec: str) -> tuple[str, str]:
    """(library, name) for a MODEL string; bare names resolved timm → torchvision."""
    spec = spec.strip()
    if spec.startswith("hf-hub:"):
        return "timm", spec
    for lib in LIBRARIES:
        if spec.startswith(lib + ":"):
            return lib, spec[len(lib) + 1 :]
    if ":" in spec and not spec.startswith(("timm", "torchvision")):
        prefix = spec.split(":", 1)[0]
        raise UnknownModelError(
            f"unknown model source {prefix!r} in {spec!r}; use timm:NAME, torchvision:NAME, "
            "hf-hub:ORG/NAME, hf:DIR (transformers) or py:package.module:function."
        )
    if _timm_has(spec):
        return "timm", spec
    if _torchvision_has(spec):
        return "torchvision", spec
    raise _unknown(spec)


def check_registered(model: str) -> None:
    """A MODEL string names a registered model (an explicit ``timm:``/``torchvision:`` name
    too, which ``parse_model`` only splits): a typo fails now, with close matches."""
    library, bare = parse_model(model)
    if library == "timm" and not bare.startswith("hf-hub:") and not _timm_has(bare):
        raise _unknown(bare, "timm")
    if library == "torchvision" and not _torchvision_has(bare):
        raise _unknown(bare, "torchvision")


def _timm_has(name: str) -> bool:
    # importing this module ran symconvert/models/__init__.py: symconvert's own are registered
    return bool(timm.is_model(name.split(".")[0]))


def _torchvision_has(name: str) -> bool:
    return name in torchvision.models.list_models()


def _unknown(name: str, library: str | None = None) -> UnknownModelError:
    pool: list[str] = []
    if library in (None, "timm"):
        pool += [f"timm:{n}" for n in timm.list_models()]
    if library in (None, "torchvision"):
        pool += [f"torchvision:{n}" for n in torchvision.models.list_models()]
    # a name both libraries have (resnet50) is one suggestion, not two
    bare = list(dict.fromkeys(p.split(":", 1)[1] for p in pool))
    close = difflib.get_close_matches(name, bare, n=5, cutoff=0.6)
    where = f"in {library}" if library else "in timm or torchvision"
    hint = f" Close matches: {', '.join(close)}." if close else ""
    # the listing command searches for the name's own family, not always '*resnet*'
    stem = re.match(r"[A-Za-z]+", name.rsplit("/", 1)[-1])
    if library == "torchvision":
        listing = "import torchvision; print(torchvision.models.list_models())"
    else:
        listing = f"import timm; print(timm.list_models('*{stem.group(0).lower() if stem else ''}*'))"
    return UnknownModelError(
        f"no model named {name!r} {where}.{hint} List names with `python -c \"{listing}\"`."
    )


def create_model(
    model: str,
    pretrained: bool = True,
    weights: str | os.PathLike | None = None,
    num_classes: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build MODEL (see the module docstring) with pretrained or local weights.

    ``weights`` (a ``.safetensors`` or ``.pth/.pt`` file read with ``weights_only=True``)
    replaces the pretrained download; ``module.``/``_orig_mod.`` prefixes are stripped.
    ``num_classes`` replaces the classifier head (timm ``reset_classifier`` semantics).
    """
    library, name = parse_model(model)
    if library == "hf":
        if weights is not None or num_classes is not None or kwargs:
            raise SymconvertError(f"{model}: --weights, --num-classes and model kwargs do not "
                                  "apply to hf: models (the directory's config and weights do).")
        return create_model_from_source(hf.source_record(name, pretrained))
    source = {
        "library": library,
        "name": name,
        "num_classes": num_classes,
        "kwargs": dict(kwargs),
        "pretrained": bool(pretrained and weights is None),
        "weights": str(Path(weights).resolve()) if weights is not None else None,
    }
    return create_model_from_source(source)


def model_string(source: dict) -> str:
    """The MODEL string of a recorded source: ``timm:resnet18``, ``hf-hub:ORG/NAME``,
    ``py:package.module:function``."""
    name = str(source.get("name"))
    return name if name.startswith("hf-hub:") else f"{source.get('library')}:{name}"


def create_model_from_source(source: dict, pretrained: bool | None = None) -> nn.Module:
    """Rebuild a model from a recorded source dict (as ``create_model`` records it).

    ``pretrained=False`` builds the bare architecture (what ``load`` does before reading
    the checkpoint); by default the recorded pretrained weights / weights file are used.
    """
    library, name = source["library"], source["name"]
    num_classes = source.get("num_classes")
    kwargs = dict(source.get("kwargs") or {})
    use_pretrained = source.get("pretrained", False) if pretrained is None else pretrained
    weights = source.get("weights") if pretrained is not False else None

    if library == "timm":
        model = _build_timm(name, use_pretrained and weights is None, num_classes, weights, kwargs)
    elif library == "torchvision":
        model = _build_torchvision(name, use_pretrained and weights is None, num_classes, weights, kwargs)
    elif library == "py":
        model = _build_py(name, num_classes, kwargs)
    elif library == "hf":
        model = hf.build_source(source, bool(use_pretrained))
    else:
        raise UnknownModelError(f"unknown model library {library!r} in the recorded source")

    if weights is not None:
        load_weights(model, weights, num_classes)
    model.symconvert_source = copy.deepcopy(source)
    return model


def _build_timm(name, pretrained, num_classes, weights, kwargs) -> nn.Module:
    if not name.startswith("hf-hub:") and not timm.is_model(name.split(".")[0]):
        raise _unknown(name, "timm")
    kw = dict(kwargs)
    if num_classes is not None:
        kw["num_classes"] = num_classes
    try:
        return timm.create_model(name, pretrained=pretrained, **kw)
    except Exception as exc:
        if pretrained and looks_offline(exc):
            raise _offline_error(f"timm:{name}", exc) from None
        if pretrained and "No pretrained weights" in str(exc):
            raise WeightsError(f"timm:{name} has no pretrained weights: pass --no-pretrained "
                               "(random init) or --weights FILE.") from None
        if name.startswith("hf-hub:") and looks_offline(exc):
            raise _hub_config_offline(name, exc) from None
        if isinstance(exc, (TypeError, ValueError)) or (kwargs and _kwarg_failure(exc)):
            raise SymconvertError(f"timm could not build {name!r}"
                                  f"{f' with {kwargs}' if kwargs else ''}: "
                                  f"{type(exc).__name__}: {exc}") from None
        raise


def _build_torchvision(name, pretrained, num_classes, weights, kwargs) -> nn.Module:
    if name not in torchvision.models.list_models():
        raise _unknown(name, "torchvision")
    kw = dict(kwargs)
    if not pretrained and num_classes is not None:
        kw["num_classes"] = num_classes
    try:
        model = torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None, **kw)
    except Exception as exc:
        if pretrained and looks_offline(exc):
            raise _offline_error(f"torchvision:{name}", exc) from None
        if isinstance(exc, (TypeError, ValueError)) or (kwargs and _kwarg_failure(exc)):
            raise SymconvertError(f"torchvision could not build {name!r}"
                                  f"{f' with {kwargs}' if kwargs else ''}: "
                                  f"{type(exc).__name__}: {exc}") from None
        raise
    if pretrained and num_classes is not None:
        reset_head(model, num_classes)
    return model


def _build_py(name, num_classes, kwargs) -> nn.Module:
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise UnknownModelError(
            f"py model {name!r} must look like py:package.module:function"
        )
    # The `symconvert` console script, unlike `python -m symconvert`, does not search the
    # current directory; a user's model module usually lives there (as for uvicorn's
    # app strings). Appended, so it never shadows an installed package.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownModelError(
            f"cannot import {module_name!r} for py:{name}: {exc}. Run from the directory "
            "that holds it, or add that directory to PYTHONPATH."
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UnknownModelError(f"{module_name!r} has no callable {attr!r} (py:{name})")
    kw = dict(kwargs)
    if num_classes is not None:
        params = _inspect.signature(factory).parameters
        if "num_classes" in params or any(p.kind == p.VAR_KEYWORD for p in params.values()):
            kw["num_classes"] = num_classes
    model = factory(**kw)
    if not isinstance(model, nn.Module):
        raise UnknownModelError(f"py:{name} returned {type(model).__name__}, not an nn.Module")
    if num_classes is not None and "num_classes" not in kw:
        reset_head(model, num_classes)
    return model


def _kwarg_failure(exc: BaseException) -> bool:
    """An error a model builder raises for keyword arguments it cannot use."""
    return isinstance(exc, (IndexError, KeyError, AttributeError, AssertionError, RuntimeError,
                            ZeroDivisionError, OverflowError))


def looks_offline(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}".lower()
    markers = (
        "connection", "offline", "urlopen", "name resolution", "resolve", "timed out",
        "localentrynotfound", "hfhubhttperror", "network", "max retries", "temporary failure",
        "cannot find the requested files", "no such host", "unreachable",
    )
    return any(m in text for m in markers) or isinstance(exc, (ConnectionError, TimeoutError))


def _offline_error(model: str, exc: BaseException) -> WeightsError:
    from huggingface_hub import constants

    hf_cache = constants.HF_HUB_CACHE
    torch_cache = os.path.join(torch.hub.get_dir(), "checkpoints")
    return WeightsError(
        f"cannot fetch pretrained weights for {model}: no network and no cached copy "
        f"(looked in the Hugging Face cache {hf_cache} and the torch hub cache {torch_cache}; "
        f"{type(exc).__name__}). Either pass a local file with --weights FILE "
        "(.safetensors, or .pth/.pt), or build the architecture with random weights "
        "with --no-pretrained."
    )


def _hub_config_offline(name: str, exc: BaseException) -> WeightsError:
    """``hf-hub:`` names need the model's config.json from the Hub even without weights."""
    from huggingface_hub import constants

    repo = name[len("hf-hub:"):].split("@", 1)[0]
    return WeightsError(
        f"cannot build {name}: even with --no-pretrained, timm needs the model's config.json "
        f"from https://huggingface.co/{repo}, and there is no network and no cached copy in "
        f"the Hugging Face cache {constants.HF_HUB_CACHE} ({type(exc).__name__}). Run once "
        "with network to cache it, or name the architecture directly (timm:NAME, e.g. the "
        "part of the hub name before the first dot) with --no-pretrained or --weights FILE."
    )


# --- heads ---------------------------------------------------------------------------


def reset_head(model: nn.Module, num_classes: int) -> None:
    """Replace the classifier with a fresh one of ``num_classes`` outputs."""
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(num_classes)
        return

    names = sorted(head_names(model), key=len)
    if not names:
        raise SymconvertError("cannot find a classifier head to reset for --num-classes")
    name = names[0]
    old = model.get_submodule(name)
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    elif isinstance(old, nn.Conv2d):
        new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride,
                        old.padding, bias=old.bias is not None)
    else:
        raise SymconvertError(f"cannot reset head {name!r} of type {type(old).__name__}")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# --- weights files --------------------------------------------------------------------


def _weights_format(path: Path) -> str:
    """``"torch"`` (a zip or pickle, as ``torch.save`` writes) or ``"safetensors"`` (an
    8-byte header length, then JSON), from the first bytes: the suffix may lie."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError as exc:
        raise WeightsError(f"cannot read weights file {path}: {exc.strerror}.") from None
    if head.startswith((b"PK\x03\x04", b"\x80")):
        return "torch"
    if head[8:9] == b"{":
        return "safetensors"
    what = "it is empty" if not head else f"it starts with {head!r}"
    raise WeightsError(f"{path} is not a weights file ({what}; neither safetensors nor a "
                       "PyTorch checkpoint). Pass a .safetensors or .pth/.pt state_dict.")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or ``.pth/.pt`` file, never unpickling objects."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"weights file {path} does not exist.")
    if not path.is_file():
        kind = "a directory" if path.is_dir() else "a device, pipe or socket"
        raise WeightsError(f"weights file {path} is not a regular file ({kind}); pass a "
                           ".safetensors or .pth/.pt file.")
    if _weights_format(path) == "safetensors":
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsError(f"{path} is not a readable safetensors file: {exc}") from None
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            # torch's first line advises weights_only=False (running the pickle); the
            # useful part is the line naming the refused global
            detail = next((ln.strip() for ln in str(exc).splitlines() if "GLOBAL" in ln
                           or "global" in ln.lower()), "")
            if not detail:  # not a refused object: a damaged pickle
                raise WeightsError(f"{path} is not a readable PyTorch weights file (a damaged "
                                   "pickle). Re-save it, or pass a .safetensors file.") from None
            raise WeightsError(
                f"{path} holds Python objects beyond tensors, which symconvert refuses to "
                f"unpickle (weights_only=True): {detail} Re-save it as a plain state_dict or "
                "as .safetensors."
            ) from None
        except Exception as exc:  # truncated zip, damaged pickle: all unusable
            raise WeightsError(f"{path} is not a readable PyTorch weights file: "
                               f"{type(exc).__name__}: {exc}") from None
        for key in ("state_dict", "model", "model_state_dict", "module"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state_dict of tensors.")
    return strip_prefixes(state)


def with_module_versions(model: nn.Module, state: dict[str, torch.Tensor]) -> dict:
    """``state`` carrying ``model``'s own per-module ``version`` metadata.

    A state_dict read from safetensors has none, and some modules' loaders require it
    (torchvision's MNASNet raises ValueError without a version).
    """
    out = OrderedDict(state)
    own = getattr(model.state_dict(), "_metadata", None)
    if own is not None:
        out._metadata = own  # type: ignore[attr-defined]
    return out


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in STRIP_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        out[key] = value
    return out


def load_weights(model: nn.Module, path: str | os.PathLike, num_classes: int | None = None) -> None:
    """Load a local weights file strictly. When ``num_classes`` was asked for and the
    file's classifier has another size, the file's head is dropped (the model keeps its
    fresh ``num_classes`` head), as timm does for pretrained weights."""
    state = read_state_dict(path)
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    head = head_names(model)
    in_head = [k for k in mismatched if k.rsplit(".", 1)[0] in head]
    if mismatched and (num_classes is None or len(in_head) != len(mismatched)):
        hint = (" Only the classifier differs: pass --num-classes N." if in_head == mismatched
                else "")
        raise WeightsError(
            f"{path} does not fit {type(model).__name__}: shape mismatch for "
            f"{', '.join(mismatched[:4])}.{hint}"
        )
    for key in in_head:
        state.pop(key)
    _fill_num_batches_tracked(model, state)
    missing, unexpected = model.load_state_dict(with_module_versions(model, state), strict=False)
    missing = [k for k in missing if k not in in_head]
    if missing or unexpected:
        raise WeightsError(
            f"{path} does not fit {type(model).__name__}: "
            f"{len(missing)} missing keys ({', '.join(missing[:3])}), "
            f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])})."
        )


def _fill_num_batches_tracked(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Old BatchNorm checkpoints (before PyTorch 0.4.1) lack ``num_batches_tracked``.
    Plain ``load_state_dict`` accepts them (the version metadata it sees says so) and
    keeps the module's own counter; ``with_module_versions`` attaches the current version,
    so fill the counter in as PyTorch does."""
    for name, module in model.named_modules():
        if not isinstance(module, _NormBase) or not module.track_running_stats:
            continue
        prefix = f"{name}." if name else ""
        key = prefix + "num_batches_tracked"
        if key in state or prefix + "running_mean" not in state:
            continue
        own = module.num_batches_tracked
        state[key] = (own.detach().clone() if own is not None and not own.is_meta
                      else torch.tensor(0, dtype=torch.long))
