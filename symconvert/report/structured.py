"""The structured-pruning baseline of ``report --compare structured``: Torch-Pruning's
DepGraph pruner (``torch_pruning.pruner.BasePruner``) with L1 magnitude importance, the
classifier head kept whole, pruned to the same number of removed parameters as the
symmetric model.

The budget is met in channel counts: a uniform pruning ratio searched by bisection (the
largest that removes no more than the budget), then one more channel at a time in any
group whose next channel still fits, so the pruned model removes the budget to within one
channel's parameters (``removed`` and ``difference`` record how close).

Where a shortcut ties channels in a way DepGraph cannot trace (CIFAR "option A" shortcuts
pad the channels of ``x[:, :, ::2, ::2]`` with zeros), only the blocks' inner channels are
pruned (each group whose channels feed nothing but the next conv/linear), and the entry
says so. Where even that cannot remove the budget, ``StructuredError`` says why.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Any

import torch
from torch import nn

from symconvert.errors import SymconvertError
from symconvert.surgery.plan import count_parameters
from symconvert.surgery.selection import head_names

#: DepGraph nodes an inner channel may pass through: norms, activations, the conv/linear.
_UNTIED_OPS = ("Relu", "Gelu", "Silu", "Sigmoid", "Hardswish", "Hardtanh", "Clamp",
               "LeakyRelu", "Elu", "Tanh", "Mish")
_BISECT_STEPS = 10


class StructuredError(SymconvertError):
    """Structured pruning cannot remove the budget on this model (the message says why)."""


@dataclasses.dataclass
class Pruned:
    model: nn.Module
    removed: int
    scope: str  # "all channels" | "inner channels"
    ratio: float
    groups: int
    note: str
    step: int  # the fewest parameters one more channel would remove


def _tp() -> Any:
    try:
        import torch_pruning as tp
    except ImportError:  # pragma: no cover - the prune extra is not installed
        raise SymconvertError("--compare structured needs Torch-Pruning: "
                              "pip install 'symconvert[prune]'") from None
    return tp


def _is_tied(dep: Any, tp: Any) -> bool:
    """Whether a DepGraph node ties the channel to something else (a sum, a pad, a
    concatenation, a reshape): anything but a layer or an activation."""
    module = dep.target.module
    if isinstance(module, nn.Module) and not type(module).__name__.startswith("_"):
        return False
    name = getattr(dep.target, "name", "") or ""
    return not (isinstance(module, tp.ops._ElementWiseOp) and any(o in name for o in _UNTIED_OPS))


def _channel_pads(model: nn.Module, example: torch.Tensor, ignored: list[nn.Module]) -> bool:
    """Whether DepGraph sees a channel pad (an option-A shortcut) in any group."""
    tp = _tp()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    for group in graph.get_all_groups(ignored_layers=ignored):
        for dep, _ in group:
            if "ConstantPadNd" in (getattr(dep.target, "name", "") or ""):
                return True
    return False


def _inner_ignored(model: nn.Module, example: torch.Tensor, head: list[nn.Module]) -> list[nn.Module]:
    """Every conv/linear except the roots of groups tied to nothing (block inner channels)."""
    tp = _tp()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    keep: set[int] = set()
    for group in graph.get_all_groups(ignored_layers=head):
        layers = [dep.target.module for dep, _ in group
                  if isinstance(dep.target.module, (nn.Conv2d, nn.Linear))
                  and graph.is_out_channel_pruning_fn(dep.handler)]
        if len(layers) == 1 and not any(_is_tied(dep, tp) for dep, _ in group):
            keep.add(id(layers[0]))
    return [m for m in model.modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and id(m) not in keep]


def _heads(model: nn.Module) -> dict[nn.Module, int]:
    """Attention layers Torch-Pruning must prune head dim by head dim: torch's
    ``MultiheadAttention`` and timm's ``Attention`` (its ``qkv``)."""
    out = {m: int(m.num_heads) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    out.update({m.qkv: int(m.num_heads) for m in model.modules()
                if isinstance(getattr(m, "qkv", None), nn.Linear) and hasattr(m, "num_heads")})
    return out


def _fix_heads(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(getattr(m, "qkv", None), nn.Linear) and hasattr(m, "head_dim"):
            m.head_dim = m.qkv.out_features // (3 * m.num_heads)


class _Search:
    """Prune fresh copies of ``model`` to per-group channel counts."""

    def __init__(self, model: nn.Module, example: torch.Tensor, ignored_names: set[str]) -> None:
        self.model, self.example, self.ignored_names = model, example, ignored_names
        self.before = count_parameters(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = self._pruner(copy.deepcopy(model), {})
        names = {id(m): n for n, m in pruner.model.named_modules()}
        self.roots = []  # (name, channels) of every group's root layer, in pruning order
        for group in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                              root_module_types=pruner.root_module_types):
            root = group[0][0].target.module
            self.roots.append((names[id(root)], int(pruner.DG.get_out_channels(root))))

    def _pruner(self, model: nn.Module, counts: dict[str, int]) -> Any:
        tp = _tp()
        modules = dict(model.named_modules())
        ratios = {modules[n]: (k - 0.5) / c if k else 0.0
                  for n, c in getattr(self, "roots", []) for k in [counts.get(n, 0)]}
        return tp.pruner.BasePruner(
            model.eval(), self.example, importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=0.0, pruning_ratio_dict=ratios, num_heads=_heads(model),
            ignored_layers=[modules[n] for n in self.ignored_names])

    def prune(self, counts: dict[str, int]) -> tuple[nn.Module, int]:
        model = copy.deepcopy(self.model)
        with warnings.catch_warnings():  # its notes on unwrapped parameters (pos_embed)
            warnings.simplefilter("ignore")
            self._pruner(model, counts).step()
        _fix_heads(model)
        return model, self.before - count_parameters(model)

    def uniform(self, ratio: float) -> dict[str, int]:
        return {n: c - max(int(c * (1 - ratio)), 1) for n, c in self.roots}


def _search(search: _Search, budget: int) -> tuple[tuple[nn.Module, int], float, int]:
    """Largest uniform ratio within the budget (bisection), then one channel at a time.
    Returns the pruned model and its removed count, the ratio, and the fewest parameters
    one more channel would have removed (so ``budget - removed`` is below it)."""
    lo, hi = 0.0, 1.0
    best, counts = search.prune({}), {}
    for _ in range(_BISECT_STEPS):
        mid = (lo + hi) / 2
        trial = search.prune(search.uniform(mid))
        if trial[1] <= budget:
            lo, best, counts = mid, trial, search.uniform(mid)
        else:
            hi = mid
        if best[1] == budget:
            break
    cost: dict[str, int] = {}  # what one more channel of each group removed when last tried
    changed = True
    while changed and best[1] < budget:  # top up, group by group, as many channels as fit
        changed = False
        for name, channels in search.roots:
            if cost.get(name, 0) > budget - best[1]:
                continue  # one more channel of this group did not fit, and still does not
            found = _gallop(search, budget, best, counts, name, channels, cost)
            if found is not None:
                (best, counts), changed = found, True
    step = min((c for c in cost.values() if c > budget - best[1]), default=0)
    return best, lo, step


def _gallop(search: _Search, budget: int, best: tuple[nn.Module, int], counts: dict[str, int],
            name: str, channels: int, cost: dict[str, int]) -> Any:
    """The most extra channels of group ``name`` that still fit (doubling, then bisecting),
    as ``((model, removed), counts)``, or None; records one channel's cost in ``cost``."""
    base = counts.get(name, 0)
    fit, over, extra, found = 0, channels - base, 1, None  # over: known not to fit
    while fit + 1 < over:
        more = {**counts, name: base + extra}
        trial = search.prune(more)
        if extra == 1:
            cost[name] = trial[1] - best[1]
        if trial[1] <= budget:
            fit, found = extra, (trial, more)
        else:
            over = extra
        extra = min(extra * 2, over - 1) if extra == fit else (fit + over) // 2
    if found is not None and found[0][1] > best[1]:
        cost[name] = 0  # it moved: its next channel's cost is unknown again
        return found
    return None


def prune_structured(model: nn.Module, budget: int, example: torch.Tensor) -> Pruned:
    """``model`` (not modified) pruned by Torch-Pruning to remove ``budget`` parameters,
    to within one channel's parameters; raises ``StructuredError`` when it cannot."""
    model = copy.deepcopy(model).eval()
    modules = dict(model.named_modules())
    head = [modules[n] for n in head_names(model) if n in modules]
    names = {id(m): n for n, m in modules.items()}
    scope, note = "all channels", "DepGraph groups (channels tied by shortcuts pruned together)"
    ignored = head
    try:
        padded = _channel_pads(model, example, head)
    except Exception as exc:  # noqa: BLE001 - DepGraph's tracing raises anything
        raise StructuredError(f"Torch-Pruning cannot trace the model ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200]})") from None
    if padded:
        scope = "inner channels"
        note = ("the shortcuts pad channels with zeros (option A), which DepGraph cannot "
                "trace: only each block's inner channels are pruned; the channels the "
                "shortcuts carry stay")
        ignored = _inner_ignored(model, example, head)
    try:
        search = _Search(model, example, {names[id(m)] for m in ignored})
        most = search.prune(search.uniform(1.0))[1] if search.roots else 0
        if most < budget:
            raise StructuredError(
                f"pruning every channel group Torch-Pruning may prune ({scope}, "
                f"{len(search.roots)} groups, the head kept) down to one channel removes "
                f"{most:,} parameters, short of the {budget:,} the symmetric model removes")
        (pruned, removed), ratio, step = _search(search, budget)
    except SymconvertError:
        raise
    except Exception as exc:  # noqa: BLE001 - a layer DepGraph cannot prune raises anything
        raise StructuredError(f"Torch-Pruning cannot prune the model ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200]})") from None
    _check_runs(pruned, example)
    return Pruned(pruned, removed, scope, ratio, len(search.roots), note, step)


def _check_runs(model: nn.Module, example: torch.Tensor) -> None:
    try:
        with torch.no_grad():
            model(example)
    except Exception as exc:  # noqa: BLE001
        raise StructuredError(f"the pruned model does not run ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200]})") from None


__all__ = ["Pruned", "StructuredError", "prune_structured"]
