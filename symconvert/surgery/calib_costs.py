"""Calibration's costs and the calibrated conversion (``symconvert.surgery.calibrate``):
``calibrated_costs`` (every eligible layer's least-squares output error per candidate scheme,
the cost ``--scheme auto`` and ``--target-reduction`` rank by when calibration data is given),
``convert_calibrated`` (``convert`` + ``calibrate``) and ``naive_from`` (the naive conversion
``report`` scores beside the calibrated one)."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from symconvert.schemes import Scheme, get_scheme
from symconvert.surgery.auto import is_auto, require_reachable
from symconvert.surgery.calib_blocks import DEFAULT_STEPS
from symconvert.surgery.calib_moments import Moments, calibration_mode, is_conv, layer_io, run_model
from symconvert.surgery.calib_solve import DEFAULT_DAMP, Fitter, SolveOptions, relative_error
from symconvert.surgery.calibrate import calibrate, calibration_batches
from symconvert.surgery.convert import apply_plan, inspect
from symconvert.surgery.layers import handler_for
from symconvert.surgery.parametrization import converted_tensors, symmetric_of
from symconvert.surgery.plan import apply_target, require_nonempty
from symconvert.surgery.rnn import refresh_flat_weights
from symconvert.surgery.selection import head_names

__all__ = ["calibrated_costs", "convert_calibrated", "naive_from"]


def calibrated_costs(model: nn.Module, data_or_loader: Any, candidates: Iterable[str | Scheme],
                     samples: int = 512, *, batch_size: int = 64, max_iter: int = 100,
                     tol: float = 1e-6, eigen_steps: int = 40, include_head: bool = False,
                     damp: float = DEFAULT_DAMP,
                     device: str | torch.device | None = None) -> dict[tuple[str, str], float]:
    """Relative output error of every eligible (conv/linear layer, candidate scheme) after
    the least-squares fit, from one pass of the (unconverted) ``model``'s own input/output
    statistics: ``{(layer_name, scheme_spec): error}``. Each layer is fitted on the source
    model's inputs (not sequentially), so the costs are independent per layer and can be
    summed by a budgeted per-layer choice (``--scheme auto``). Layers no candidate applies
    to are absent. ``model`` is not changed."""
    schemes = [get_scheme(s) for s in candidates]
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)
    batches = calibration_batches(data_or_loader, samples, model=model, batch_size=batch_size)
    todo = _eligible_layers(model, schemes, include_head)
    moments = _collect_moments(model, todo, batches, device)
    opts = SolveOptions(max_iter=max_iter, tol=tol, eigen_steps=eigen_steps, damp=damp)
    costs: dict[tuple[str, str], float] = {}
    for name, (module, ok) in todo.items():
        mom = moments[name]
        if mom.h is None:
            continue
        w = module.weight.detach().double()
        b = module.bias.detach().double() if module.bias is not None else None
        cg = module.groups if is_conv(module) else 1
        for scheme in ok:
            fitter = Fitter(scheme, tuple(w.shape), cg, cg, b is not None)
            p0 = scheme.pack(w, cg)
            naive = relative_error(fitter.wb(p0, b), mom)
            p, bb = fitter.solve(p0, b, mom, opts)
            costs[(name, scheme.spec)] = min(naive, relative_error(fitter.wb(p, bb), mom))
    return costs


def _eligible_layers(model: nn.Module, schemes: list[Scheme], include_head: bool
                     ) -> dict[str, tuple[nn.Module, list[Scheme]]]:
    """The unconverted conv/linear layers (the head only if ``include_head``) and the
    candidate schemes that apply to each and save parameters."""
    head = set(head_names(model)) if not include_head else set()
    todo: dict[str, tuple[nn.Module, list[Scheme]]] = {}
    for name, module in model.named_modules():
        handler = handler_for(module)
        if handler is None or handler.kind not in ("conv", "linear") or name in head:
            continue
        if symmetric_of(module, "weight") is not None:
            continue
        shape, groups = tuple(module.weight.shape), getattr(module, "groups", 1)
        if getattr(module, "transposed", False):
            continue
        ok = [s for s in schemes if handler.kind in s.kinds and s.check(shape, groups) is None
              and s.free_count(shape, groups) < module.weight.numel()]
        if ok:
            todo[name] = (module, ok)
    return todo


def _collect_moments(model: nn.Module, todo: dict[str, tuple[nn.Module, list[Scheme]]], batches,
                     device: torch.device) -> dict[str, Moments]:
    """One pass of ``model`` over ``batches``: every ``todo`` layer's own input/output moments."""
    moments: dict[str, Moments] = {}
    handles = []
    for name, (module, _) in todo.items():
        bias = getattr(module, "bias", None)
        moments[name] = Moments(bias is not None)

        def hook(mod, args, out, _name=name):
            xs, ys = layer_io(mod, args[0].detach(), out.detach())
            moments[_name].add(xs, ys)
        handles.append(module.register_forward_hook(hook))
    try:
        with calibration_mode(model):
            for x in batches:
                run_model(model, x, device)
    finally:
        for h in handles:
            h.remove()
    return moments


# ----------------------------------------------------------------------------- convert


def convert_calibrated(model: nn.Module, scheme: str | Scheme, data_or_loader: Any,
                       samples: int = 512, *, target_reduction: float | None = None,
                       progress: bool | None = None, schemes=None, costs=None,
                       damp: float = DEFAULT_DAMP, steps: int = DEFAULT_STEPS,
                       device: str | None = "auto", blocks: str | None = None,
                       **selection: Any):
    """``convert`` + ``calibrate`` (what ``convert(..., calibrate=DATA)`` runs). With
    ``target_reduction`` the layers are ranked by their least-squares output error on the
    calibration data (``calibrated_costs``) rather than by the weight error; with
    ``scheme="auto"`` those errors (squared, the planner's scale) are the per-layer costs."""
    allow_empty = selection.pop("allow_empty", False)
    source = copy.deepcopy(model)
    include_head = bool(selection.get("include_head"))
    if is_auto(scheme):
        if costs is None:
            costs = _auto_costs(source, data_or_loader, samples, include_head, damp)
        plan = inspect(model, scheme, allow_empty=True, target_reduction=target_reduction,
                       schemes=schemes, costs=costs, **selection)
        require_reachable(plan)
    else:
        plan = inspect(model, scheme, allow_empty=True, target_reduction=None,
                       _with_error=True, **selection)
        if target_reduction is not None:
            spec = get_scheme(scheme).spec
            table = calibrated_costs(source, data_or_loader, [spec], samples,
                                     include_head=include_head, damp=damp)
            errors = {name: err for (name, s), err in table.items() if s == spec}
            apply_target(plan, target_reduction, errors=errors)
            plan.target_reduction = target_reduction
    require_nonempty(plan, allow_empty)
    apply_plan(model, plan)
    calibrate(model, source, data_or_loader, samples, plan=plan, progress=progress, damp=damp,
              steps=steps, device=device, blocks=blocks)
    return model, plan


def _auto_costs(source: nn.Module, data_or_loader: Any, samples: int, include_head: bool,
                damp: float = DEFAULT_DAMP):
    """The ``--scheme auto`` cost function of a calibrated conversion: the squared relative
    output error after the least-squares fit, for every (layer, scheme) pair calibration
    prices (conv and linear); the planner falls back to the weight error for the others."""

    def costs(pairs: list[tuple[str, str]]) -> dict[tuple[str, str], float]:
        specs = sorted({s for _, s in pairs})
        table = calibrated_costs(source, data_or_loader, specs, samples,
                                 include_head=include_head, damp=damp)
        return {key: err ** 2 for key, err in table.items()}

    costs.name = "calibrated output error²"
    costs.partial = True
    return costs


def naive_from(model: nn.Module, source_model: nn.Module) -> nn.Module:
    """A copy of the converted ``model`` with the *naive* conversion of ``source_model``:
    every packed tensor is ``pack`` of the source weight (the nearest symmetric weight),
    every other tensor (biases, BatchNorm statistics) the source's. What ``report`` scores
    as "converted" next to the calibrated model."""
    out = copy.deepcopy(model)
    src_state = source_model.state_dict()
    with torch.no_grad():
        for name, module, tensor, sym in converted_tensors(out):
            weight = src_state[f"{name}.{tensor}" if name else tensor]
            module.parametrizations[tensor].original.copy_(
                sym.scheme.pack(weight.to(torch.float64), sym.groups).to(weight.dtype))
        for key, value in out.state_dict().items():
            if ".parametrizations." not in key and key in src_state:
                value.copy_(src_state[key])
    for m in out.modules():
        if isinstance(m, nn.RNNBase):
            refresh_flat_weights(m)
    return out
