"""Surgery: the plan of a conversion (``inspect``), carrying it out (``apply_plan``,
``attach``) and undoing it into plain dense weights (``fold``). The public ``convert``
(plain, auto or calibrated) is ``symconvert.surgery.api``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from symconvert.errors import SymconvertError
from symconvert.schemes import Scheme
from symconvert.surgery.auto import build_auto_plan, is_auto
from symconvert.surgery.auto_flops import flops_target
from symconvert.surgery.config import ConvertConfig
from symconvert.surgery.layers import handler_for
from symconvert.surgery.parametrization import Symmetric, converted_tensors
from symconvert.surgery.plan import Plan, build_plan, require_nonempty


def inspect(model: nn.Module, scheme: str | Scheme | ConvertConfig, /, *,
            _with_error: bool = True, **options: Any) -> Plan:
    """The plan ``convert`` would carry out; the model is not changed. Takes a
    ``ConvertConfig`` or its fields as keywords (``include``, ``exclude``, ``layers``,
    ``min_channels``, ``include_head``, ``gates``, ``allow_empty`` (default True here),
    ``target_reduction``, ``schemes``, ``costs``); calibration keys are ignored.

    ``scheme="auto"`` (with ``target_reduction``) chooses per layer one of ``schemes``
    (default ``symconvert.surgery.auto.DEFAULT_SCHEMES``) or none, at the least total cost: the
    weight error, or ``costs`` ({(layer_name, scheme): cost} or a function of the
    candidate pairs returning it). See ``symconvert.surgery.auto``."""
    if not isinstance(scheme, ConvertConfig):
        options.setdefault("allow_empty", True)
    config = ConvertConfig.of(scheme, **options)
    selection = config.selection()
    if is_auto(config.scheme):
        plan = build_auto_plan(model, selection, config.target_reduction, config.schemes,
                               config.costs, flops=flops_target(model, config))
    elif config.target_flops is not None:
        raise SymconvertError("--target-flops chooses among schemes: use --scheme auto "
                              f"--schemes {config.scheme} --target-flops {config.target_flops}.")
    elif config.schemes is not None or config.costs is not None:
        raise SymconvertError("--schemes (and costs=) choose among candidates for --scheme auto; "
                              f"with --scheme {config.scheme} leave them out.")
    else:
        plan = build_plan(model, config.scheme, selection, config.target_reduction,
                          with_error=_with_error)
    require_nonempty(plan, config.allow_empty)
    return plan


def apply_plan(model: nn.Module, plan: Plan) -> nn.Module:
    for entry in plan.converted:
        module = model.get_submodule(entry.module)
        weight = getattr(module, entry.tensor).detach()
        attach(model, entry.module, entry.tensor, entry.scheme, tuple(entry.shape), entry.groups,
               aliases=entry.aliases)
        if entry.symmetrization_error is None and not weight.is_meta:
            with torch.no_grad():
                norm = weight.float().norm()
                rebuilt = getattr(module, entry.tensor).float()
                entry.symmetrization_error = float((weight.float() - rebuilt).norm() / norm) if norm > 0 else 0.0
    return model


def attach(
    model: nn.Module,
    module_name: str,
    tensor: str,
    scheme: str | Scheme,
    shape: tuple[int, ...],
    groups: int,
    aliases: list[str] | tuple[str, ...] = (),
    pack: bool = True,
) -> None:
    """Parametrize ``model.<module_name>.<tensor>`` (and its tied aliases, which then share
    the very same packed tensor). ``pack=False`` leaves the packed tensor zero, for a
    caller that loads its values next."""
    module = model.get_submodule(module_name)
    sym = Symmetric(scheme, shape, groups)
    sym.shape_only = not pack
    with torch.no_grad():
        parametrize.register_parametrization(module, tensor, sym, unsafe=True)
    handler = handler_for(module)
    if handler is not None:
        handler.after_convert(module)
    for alias in aliases:
        alias_module, alias_tensor = split_alias(model, alias, tensor)
        with torch.no_grad():
            # The first registration turned the shared Parameter into the packed tensor
            # in place (parametrize's `set_`), so the alias now holds the packed shape:
            # give it a dense stand-in to register over; its ParametrizationList is
            # replaced by the shared one just below.
            dense = getattr(module, tensor).detach().clone()
            delattr(alias_module, alias_tensor)
            alias_module.register_parameter(alias_tensor, nn.Parameter(dense))
            parametrize.register_parametrization(
                alias_module, alias_tensor, Symmetric(scheme, shape, groups), unsafe=True
            )
        # share the ParametrizationList itself: one packed tensor, converted once
        alias_module.parametrizations[alias_tensor] = module.parametrizations[tensor]
        alias_handler = handler_for(alias_module)
        if alias_handler is not None:
            alias_handler.after_convert(alias_module)


def split_alias(model: nn.Module, alias: str, default_tensor: str) -> tuple[nn.Module, str]:
    """The module and tensor name a tied alias names: a module (its ``default_tensor``) or
    ``module.tensor``; ``AttributeError`` when the model has neither."""
    try:
        return model.get_submodule(alias), default_tensor
    except AttributeError:
        module_name, _, tensor = alias.rpartition(".")
        return model.get_submodule(module_name), tensor


def fold(model: nn.Module) -> nn.Module:
    """Fold every symmetric parametrization back into a plain dense weight, in place.

    The result has the source model's own classes and state_dict keys (loadable by plain
    timm/torchvision), with weights equal to the unpacked symmetric ones and no runtime
    overhead. Tied tensors stay tied. Returns ``model``.
    """
    entries = list(converted_tensors(model))
    # tied tensors share one ParametrizationList: fold it once, then re-tie the aliases
    folded: dict[int, nn.Parameter] = {}
    for _, module, tensor, _ in entries:
        plist = module.parametrizations[tensor]
        shared = folded.get(id(plist))
        # Folding the first user turns the shared packed Parameter into the dense one in
        # place (parametrize's `set_`); unpacking it again for an alias would read a dense
        # tensor as packed, so an alias just takes that Parameter back unparametrized.
        parametrize.remove_parametrizations(module, tensor, leave_parametrized=shared is None)
        if shared is None:
            folded[id(plist)] = getattr(module, tensor)
        else:
            setattr(module, tensor, shared)
        handler = handler_for(module)
        if handler is not None:
            handler.after_fold(module)
    return model
