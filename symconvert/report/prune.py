"""The pruning baseline of ``report --compare prune``: global L1 unstructured magnitude
pruning (``torch.nn.utils.prune.global_unstructured``) at an exact number of removed weights.

Unstructured zeros are counted honestly (non-zero entries), but they do not shrink a dense
file: the pruned model is stored with every zero, so its file is as large as the source's.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import prune as torch_prune

from symconvert.errors import SymconvertError
from symconvert.surgery.layers import handler_for


def prunable_tensors(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """Every weight matrix/kernel of a conv, linear or RNN layer (the layers symmetry can
    convert), head included: the pruner may choose where to remove weights."""
    out: list[tuple[nn.Module, str]] = []
    seen: set[int] = set()
    for _, module in model.named_modules():
        if handler_for(module) is None:
            continue
        for name, param in module.named_parameters(recurse=False):
            if name.startswith("weight") and param.ndim >= 2 and id(param) not in seen:
                seen.add(id(param))
                out.append((module, name))
    return out


def prune_global_l1(model: nn.Module, remove: int) -> int:
    """Zero the ``remove`` smallest-magnitude weights over all of ``prunable_tensors``
    (one global threshold), in place; masks stay attached so that fine-tuning keeps them
    at zero. Returns the number of prunable weights it chose from."""
    targets = prunable_tensors(model)
    pool = sum(getattr(m, n).numel() for m, n in targets)
    if remove < 0 or remove > pool:
        raise SymconvertError(
            f"cannot prune {remove:,} weights: the model has {pool:,} prunable conv/linear/rnn "
            "weights. The pruning baseline needs a model whose saving fits in those layers."
        )
    if remove == 0:
        return pool
    # An int amount is an exact count (a float would be a rounded fraction).
    torch_prune.global_unstructured(targets, pruning_method=torch_prune.L1Unstructured,
                                    amount=int(remove))
    return pool


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold the pruning masks into plain weights (``weight = weight_orig * mask``), in place,
    so the model has the source's own state_dict keys again."""
    for _, module in model.named_modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, torch_prune.BasePruningMethod):
                torch_prune.remove(module, hook._tensor_name)
    return model


def count_nonzero(model: nn.Module) -> int:
    """Non-zero entries over all parameters (shared tensors once), with pruning masks
    applied: the honest parameter count of an unstructured-pruned model."""
    total = 0
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if name.endswith("_orig") and hasattr(module, name[: -len("_orig")] + "_mask"):
                # masked: count what the forward sees
                total += int((getattr(module, name[: -len("_orig")]) != 0).sum())
            else:
                total += int((param != 0).sum())
    return total


__all__ = ["count_nonzero", "make_permanent", "prunable_tensors", "prune_global_l1"]
