"""A transformers model folded back into a Hugging Face directory: ``config.json``,
``model.safetensors`` (transformers' own keys; GPT-2's ``Conv1D`` weights in × out again)
and the tokenizer files of the source directory, which ``transformers``'
``AutoModel*.from_pretrained`` loads unchanged. ``export --format dense`` of an ``hf:``
model writes this directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from symconvert.errors import SymconvertError
from symconvert.io.checkpoint import dedupe
from symconvert.models.hf import (
    CONFIG_NAME,
    TOKENIZER_FILES,
    WEIGHTS_FILE,
    is_hf,
    tokenizer_dir,
    transformers_state,
)
from symconvert.surgery.convert import fold


def write_transformers_dir(model: nn.Module, directory: Path, dtype: torch.dtype) -> Path:
    """Write the folded ``model`` (an ``hf:`` model, folded in place) into ``directory``
    (existing, empty). Tied weights are stored once, as ``save_pretrained`` does."""
    if not is_hf(model):
        raise SymconvertError("a transformers directory is written for hf: models only.")
    fold(model).eval()
    state, _aliases = dedupe(transformers_state(model))
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    config = dict((getattr(model, "symconvert_source", None) or {}).get("config")
                  or model.config.to_dict())
    if "dtype" in config or "torch_dtype" in config:
        config["dtype" if "dtype" in config else "torch_dtype"] = str(dtype).removeprefix("torch.")
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    source = tokenizer_dir(model)
    for name in TOKENIZER_FILES:
        if source is not None and (source / name).is_file():
            shutil.copyfile(source / name, directory / name)
    return directory


__all__ = ["write_transformers_dir"]
