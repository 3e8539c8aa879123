"""Hugging Face ``transformers`` models: ``hf:DIR`` and ``hf:ORG/NAME``.

``hf:DIR`` is a local directory holding ``config.json`` and ``model.safetensors`` (as
``save_pretrained`` writes it); ``hf:ORG/NAME`` is looked up in the local Hugging Face
cache only (offline; absent: exit 2). The architecture is the class ``config.json`` names
in ``architectures`` — one of transformers' own base, causal-LM or sequence-classification
classes for the config's ``model_type`` (the Auto classes' tables) — built from the config;
the weights come from safetensors only (a ``pytorch_model.bin`` is never unpickled), and
code a config names (``auto_map``) is never run: such a config is refused.

The built model is an ``HFModel``: ``model(input_ids[B, T], attention_mask=None)`` returns
one tensor (logits for causal LMs and classifiers, the last hidden state for encoders), so
calibration, FLOPs, latency and tasks see a plain module. GPT-2's ``Conv1D`` (weight
in × out) is replaced at build time by the ``nn.Linear`` it equals (weight transposed), so
every scheme and calibration sees a Linear; ``transformers_state`` transposes it back.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from symconvert.errors import SymconvertError, UnknownModelError, WeightsError

PREFIX = "hf:"
CONFIG_NAME = "config.json"
WEIGHTS_FILE = "model.safetensors"
#: files a transformers directory carries besides config and weights (copied by export)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt", "vocab.json", "merges.txt", "generation_config.json")
#: config keys refused: code to import (auto_map), libraries to load (quantization)
REFUSED_KEYS = {"auto_map": "names Python code to import (trust_remote_code)",
                "trust_remote_code": "asks to run the directory's code",
                "custom_pipelines": "names Python code to import",
                "quantization_config": "asks for a quantization backend"}
#: the kernels a config may choose (others may be fetched from the Hub and run)
KERNELS = (None, "eager", "sdpa")
MAX_CONFIG_BYTES = 1_000_000
KINDS = ("causal-lm", "sequence-classification", "encoder")
_REPO = re.compile(r"^[A-Za-z0-9_.\-]{1,96}/[A-Za-z0-9_.\-]{1,96}$")


class HFModel(nn.Module):
    """A transformers model behind a one-tensor forward (see the module docstring)."""

    def __init__(self, model: nn.Module, kind: str) -> None:
        super().__init__()
        self.model = model
        self.hf_kind = kind
        head = {"causal-lm": "model.lm_head", "sequence-classification": _cls_head(model),
                "encoder": "model.pooler.dense"}[kind]
        # selection.head_names reads the classifier's name here (as for timm models)
        self.pretrained_cfg = {"classifier": head}
        self.train(model.training)  # built in eval mode, as from_pretrained returns it

    @property
    def config(self) -> Any:
        return self.model.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        extra = {"use_cache": False} if self.hf_kind == "causal-lm" else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True,
                         **extra)
        return out.last_hidden_state if self.hf_kind == "encoder" else out.logits


def _cls_head(model: nn.Module) -> str:
    for name in ("classifier", "score", "classifier.out_proj"):
        try:
            sub = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(sub, nn.Linear):
            return f"model.{name}"
    return "model.classifier"


def is_hf(model: nn.Module) -> bool:
    return isinstance(model, HFModel)


# ----------------------------------------------------------------------------- config


def _tables() -> dict[str, dict[str, str]]:
    from transformers.models.auto import modeling_auto as auto

    return {"encoder": auto.MODEL_MAPPING_NAMES,
            "causal-lm": auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            "sequence-classification": auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES}


def check_config(config: Any, where: str) -> tuple[str, str]:
    """``(architecture class name, kind)`` of a transformers config dict, or a
    ``SymconvertError`` naming why symconvert will not build it (no code is imported)."""
    from transformers import CONFIG_MAPPING

    if not isinstance(config, dict):
        raise SymconvertError(f"{where}: the transformers config is not a JSON object.")
    for key, why in REFUSED_KEYS.items():
        if key in config:
            raise SymconvertError(
                f"{where}: the config has {key!r}, which {why}; symconvert never runs code "
                "a model directory names (no trust_remote_code). Use a model whose "
                "architecture ships with transformers.")
    _check_kernels(config, where)
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise UnknownModelError(f"{where}: model_type {model_type!r} is not a transformers "
                                "architecture (custom code is not run).")
    archs = config.get("architectures") or []
    if not (isinstance(archs, list) and len(archs) <= 1 and all(isinstance(a, str) for a in archs)):
        raise SymconvertError(f"{where}: 'architectures' must name one class, got {archs!r}.")
    tables = _tables()
    arch = archs[0] if archs else tables["encoder"].get(model_type)
    for kind in ("causal-lm", "sequence-classification", "encoder"):
        names = tables[kind].get(model_type)
        names = [names] if isinstance(names, str) else list(names or ())
        if arch in names:
            return arch, kind
    raise UnknownModelError(
        f"{where}: architecture {arch!r} ({model_type}) is not supported: symconvert builds "
        "transformers' base models, *ForCausalLM/*LMHeadModel and *ForSequenceClassification.")


def _check_kernels(config: dict[str, Any], where: str, depth: int = 0) -> None:
    """``attn_implementation`` (and the like, in sub-configs too) only names a kernel
    transformers ships: a Hub kernel repository would be downloaded and run."""
    for key, value in config.items():
        chosen = list(value.values()) if isinstance(value, dict) else [value]
        if "implementation" in key and any(isinstance(v, str) and v not in KERNELS or
                                           isinstance(v, (dict, list)) for v in chosen):
            raise SymconvertError(
                f"{where}: {key} = {value!r}; symconvert builds with transformers' own "
                f"kernels only ({', '.join(k for k in KERNELS if k)}): another name may be code "
                "fetched from the Hub and run.")
        if isinstance(value, dict) and depth < 4:
            _check_kernels(value, where, depth + 1)


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise WeightsError(f"{directory} is not a Hugging Face model directory: no {CONFIG_NAME}.")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise WeightsError(f"{path} is larger than {MAX_CONFIG_BYTES:,} bytes; not a config.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise WeightsError(f"{path} is not a readable JSON config: {exc}") from None
    check_config(config, str(path))
    return config


def resolve_dir(name: str) -> Path:
    """The local directory of ``hf:DIR`` or, for ``hf:ORG/NAME``, its cached snapshot."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve()
    if not _REPO.match(name) or name.startswith((".", "/", "~")):
        raise UnknownModelError(f"hf:{name}: no such directory, and not an ORG/NAME hub id.")
    from huggingface_hub import constants, try_to_load_from_cache

    cache = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE  # as set now
    found = try_to_load_from_cache(name, CONFIG_NAME, cache_dir=cache)
    if not isinstance(found, str):
        raise WeightsError(
            f"hf:{name} is not in the local Hugging Face cache ({cache}) and "
            "symconvert does not download. Download it once (huggingface-cli download "
            f"{name}) or pass a local directory: hf:DIR with config.json and model.safetensors.")
    return Path(found).parent


# ----------------------------------------------------------------------------- build


def build(config: dict[str, Any], where: str = "the recorded config") -> HFModel:
    """An ``HFModel`` of ``config`` with random weights (``Conv1D`` already a Linear)."""
    import transformers

    arch, kind = check_config(config, where)
    model_type = config["model_type"]
    try:
        cfg = transformers.CONFIG_MAPPING[model_type].from_dict(dict(config))
        model = getattr(transformers, arch)(cfg)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise SymconvertError(f"{where}: transformers cannot build {arch}: "
                              f"{type(exc).__name__}: {exc}") from None
    model.eval()
    linearize(model)
    return HFModel(model, kind)


def linearize(model: nn.Module) -> int:
    """Replace each transformers ``Conv1D`` by the equal ``nn.Linear``; returns how many."""
    from transformers.pytorch_utils import Conv1D

    swaps = [(n, m) for n, m in model.named_modules() if isinstance(m, Conv1D)]
    for name, conv in swaps:
        weight = conv.weight  # [in, out]
        linear = nn.Linear(weight.shape[0], weight.shape[1], bias=conv.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight.t())
            if conv.bias is not None:
                linear.bias.copy_(conv.bias)
        linear.hf_conv1d = True
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
    return len(swaps)


def load_pretrained(model: HFModel, directory: Path) -> None:
    """Read ``directory/model.safetensors`` into ``model`` (key prefixes of a base model
    saved alone, or of a task model, are matched; tied weights re-tied)."""
    state, path = read_safetensors(directory)
    inner = model.model
    state = _match_prefix(inner, state)
    own = inner.state_dict()
    for key, value in list(state.items()):  # Conv1D weights are stored in × out
        if key in own and _is_conv1d_weight(inner, key) and value.dim() == 2:
            state[key] = value.t()
    missing, unexpected = inner.load_state_dict(state, strict=False)
    tied = _tied_keys(inner)
    missing = [k for k in missing if k not in tied]
    unexpected = [k for k in unexpected if not k.endswith(("position_ids", ".attn.bias",
                                                           ".attn.masked_bias"))]
    if missing or unexpected:
        raise WeightsError(f"{path} does not fit {type(inner).__name__}: {len(missing)} missing "
                           f"({', '.join(missing[:3])}), {len(unexpected)} unexpected "
                           f"({', '.join(unexpected[:3])}).")


def read_safetensors(directory: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The tensors of ``model.safetensors``, or of the shards its ``.index.json`` names
    (plain file names inside ``directory``); a pickle (``*.bin``) is never read."""
    path = directory / WEIGHTS_FILE
    index = directory / (WEIGHTS_FILE + ".index.json")
    if path.is_file():
        files = [path]
    elif index.is_file():
        try:
            names = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise WeightsError(f"{index} is not a readable shard index: {exc}") from None
        if not all(isinstance(n, str) and re.fullmatch(r"[\w.\-]+\.safetensors", n) for n in names):
            raise WeightsError(f"{index} names shards that are not .safetensors files beside it.")
        files, path = [directory / n for n in sorted(names)], index
    else:
        other = [p.name for p in directory.glob("*.bin")]
        hint = (f" It holds {', '.join(other)}: symconvert reads safetensors only (a pickle is "
                "never loaded); convert it with transformers' save_pretrained("
                "safe_serialization=True).") if other else ""
        raise WeightsError(f"{directory} has no {WEIGHTS_FILE}.{hint}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsError(f"{file} is not a readable safetensors file: {exc}") from None
    return state, path


def _is_conv1d_weight(model: nn.Module, key: str) -> bool:
    module_name, _, tensor = key.rpartition(".")
    try:
        return tensor == "weight" and getattr(model.get_submodule(module_name), "hf_conv1d", False)
    except AttributeError:
        return False


def _tied_keys(model: nn.Module) -> set[str]:
    """Keys whose tensor is another key's (tied embeddings): missing from a file is fine."""
    seen: dict[int, str] = {}
    tied: set[str] = set()
    for key, value in model.state_dict(keep_vars=True).items():
        if id(value) in seen:
            tied.add(key)
            tied.add(seen[id(value)])
        seen.setdefault(id(value), key)
    return tied


def _match_prefix(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A base model's keys into a task model (``transformer.``), or the reverse."""
    own = set(model.state_dict())
    prefix = getattr(model, "base_model_prefix", "") + "."
    if prefix == "." or not state or sum(k in own for k in state) * 2 > len(state):
        return state
    added = {prefix + k: v for k, v in state.items()}
    if sum(k in own for k in added) * 2 > len(state):
        return {(prefix + k if prefix + k in own else k): v for k, v in state.items()}
    return {k.removeprefix(prefix): v for k, v in state.items()}


def transformers_state(model: HFModel) -> dict[str, torch.Tensor]:
    """The transformers model's own state_dict (no ``model.`` prefix), Conv1D weights
    transposed back to in × out: ``from_pretrained`` loads it (``model`` folded)."""
    state = {}
    for key, value in model.model.state_dict().items():
        if _is_conv1d_weight(model.model, key):
            value = value.t()
        state[key] = value.detach().contiguous()
    return state


def source_record(name: str, pretrained: bool = True) -> dict[str, Any]:
    """What ``create_model("hf:NAME")`` records: the config itself (``load`` rebuilds from
    it, never from the directory) and where the weights and tokenizer were."""
    directory = resolve_dir(name)
    config = read_config(directory)
    return {"library": "hf", "name": name, "num_classes": None, "kwargs": {},
            "pretrained": bool(pretrained), "weights": None, "config": config,
            "path": str(directory)}


def build_source(source: dict[str, Any], pretrained: bool) -> HFModel:
    """The model of a recorded ``hf`` source; ``pretrained`` reads its directory's weights."""
    if source.get("weights"):
        raise WeightsError("hf: models read their weights from the directory's "
                           "model.safetensors; --weights does not apply.")
    model = build(source["config"], f"hf:{source['name']}")
    if pretrained:
        directory = Path(source.get("path") or resolve_dir(source["name"]))
        if not directory.is_dir():
            raise WeightsError(f"hf:{source['name']}: the directory {directory} is gone.")
        load_pretrained(model, directory)
    return model


def tokenizer_dir(model: nn.Module) -> Path | None:
    """Where the model's tokenizer files are: its recorded source directory."""
    source = getattr(model, "symconvert_source", None) or {}
    path = source.get("path")
    return Path(path) if path and os.path.isdir(path) else None


__all__ = ["HFModel", "KINDS", "PREFIX", "TOKENIZER_FILES", "build", "build_source",
           "check_config", "is_hf", "linearize", "load_pretrained", "read_config", "read_safetensors",
           "resolve_dir", "source_record", "tokenizer_dir", "transformers_state"]
