"""Storage precision of written tensors (``--dtype``): ``float32`` (default), ``bfloat16``,
``float16``. Model directories, fine-tuned directories and exports store their floating
tensors in it; ``load`` reads any of them back into a float32 model."""

from __future__ import annotations

import torch

from symconvert.errors import SymconvertError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DTYPE_NAMES = tuple(DTYPES)
_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype:
    """``float32|bfloat16|float16`` (also ``torch.float16``, ``fp16``, ``bf16``) → dtype."""
    if value is None:
        return torch.float32
    if isinstance(value, torch.dtype):
        if value in DTYPES.values():
            return value
        raise SymconvertError(f"unsupported storage dtype {value}; choose float32, bfloat16 or float16.")
    key = str(value).strip().lower().removeprefix("torch.")
    key = _ALIASES.get(key, key)
    if key not in DTYPES:
        raise SymconvertError(f"--dtype {value!r}: choose float32, bfloat16 or float16.")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


__all__ = ["DTYPES", "DTYPE_NAMES", "dtype_name", "parse_dtype"]
