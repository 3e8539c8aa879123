"""Calibrated conversion: fit every converted layer so that it reproduces the source
layer's *output* on a few hundred real inputs (post-training calibration, as GPTQ /
AdaRound do for quantisation).

Layers are fitted one after another in forward order (sequential): for the layer being
fitted, the input is what the *converted* model (all earlier layers already fitted) feeds
it, and the target is what the *source* model's same layer outputs on the same images.
Each layer is affine in its weight, so the fit is a least-squares problem

    min_{P, b} || [unpack(P) | b] X - Y ||²

that only needs the float64 moments H = X Xᵀ, C = Y Xᵀ and ||Y||², accumulated batch by
batch (no activations are kept). For a scheme whose ``unpack`` is linear (every scheme but
``eigen:K``) the normal equations Jᵀ(J(P) H) = Jᵀ C are solved by preconditioned
conjugate gradients in the scheme's own packed space, the adjoint Jᵀ of ``unpack`` being
autograd's vector-Jacobian product; ``eigen:K`` takes L-BFGS steps on the same objective.

Convolutions (1d/2d/3d, grouped and depthwise) are seen through their im2col columns
(one moment matrix per group), linears with every token/position as a row, and LSTM/GRU
gate blocks with the layer's input sequence (``weight_ih``) or previous hidden states
(``weight_hh``) as inputs. BatchNorm running statistics are re-estimated on the
calibration set afterwards.

This module is the public API; the hooks, fit units and moment accumulation live in
``symconvert.surgery.calib_moments`` and the solvers and per-layer fits in
``symconvert.surgery.calib_solve``.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from symconvert.schemes import Scheme, get_scheme
from symconvert.surgery.calib_moments import (
    CalibrationError,
    _calibration_mode,
    _fittable,
    _forward_order,
    _is_conv,
    _layer_io,
    _Moments,
    _run,
    _units,
)
from symconvert.surgery.calib_solve import (
    DEFAULT_DAMP,
    SolveOptions,
    _fit_mha,
    _fit_rnn,
    _fit_unit,
    _Fitter,
    relative_error,
)
from symconvert.surgery.parametrization import converted_tensors, symmetric_of

__all__ = ["CalibrationResult", "calibrate", "calibrated_costs", "calibration_batches",
           "reestimate_batchnorm"]


# ----------------------------------------------------------------------------- data


def calibration_batches(data_or_loader: Any, samples: int = 512, *, model: nn.Module | None = None,
                        batch_size: int = 64, seed: int = 0) -> list[torch.Tensor]:
    """The calibration inputs: the first ``samples`` inputs of ``data_or_loader``, kept as
    a list of input batches (inputs only, never activations).

    ``data_or_loader`` is a ``--data`` spec string (the train split, no augmentation), a
    ``Loaders`` (its ``train`` loader), a DataLoader or any iterable of batches (a batch is
    a tensor or a tuple/list whose first item is the input), or one input tensor.
    """
    if samples < 1:
        raise CalibrationError(f"--calibration-samples must be >= 1, got {samples}.")
    from symconvert.tasks.data import DataSpec, Loaders, create_loaders

    source = data_or_loader
    if isinstance(source, (str, DataSpec)):
        loaders = create_loaders(source, model, batch_size=batch_size, augment=False, seed=seed,
                                 subsample=None)
        source = loaders
    if isinstance(source, Loaders):
        source = source.train if source.train is not None else source.eval
    if isinstance(source, torch.Tensor):
        source = source.split(batch_size)
    out: list[torch.Tensor] = []
    seen = 0
    for batch in source:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, torch.Tensor):
            raise CalibrationError(f"calibration batches must hold tensors, got {type(x).__name__}.")
        x = x[: samples - seen]
        out.append(x)
        seen += len(x)
        if seen >= samples:
            break
    if not out:
        raise CalibrationError("the calibration data yielded no batch.")
    return out


def _data_text(data_or_loader: Any) -> str:
    from symconvert.tasks.data import DataSpec, Loaders

    if isinstance(data_or_loader, DataSpec):
        return data_or_loader.text
    if isinstance(data_or_loader, str):
        return data_or_loader
    if isinstance(data_or_loader, Loaders):
        return data_or_loader.spec.text
    return type(data_or_loader).__name__


# ----------------------------------------------------------------------------- progress


class _Progress:
    """A rich progress bar on a terminal, plain log lines otherwise."""

    def __init__(self, total: int, enabled: bool | None, title: str) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.enabled = True if enabled is None else enabled
        self.total, self.done, self.title = total, 0, title
        self.bar = None
        if self.enabled and self.console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), console=self.console, transient=False)
            self.task = self.bar.add_task(title, total=total)
            self.bar.start()

    def step(self, name: str, naive: float | None, fitted: float | None) -> None:
        self.done += 1
        if not self.enabled:
            return
        detail = ""
        if naive is not None and fitted is not None:
            detail = f" output error {naive:.3f} -> {fitted:.3f}"
        if self.bar is not None:
            self.bar.update(self.task, advance=1, description=f"{self.title}: {name}")
        else:
            print(f"calibrate [{self.done}/{self.total}] {name}{detail}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# ----------------------------------------------------------------------------- results


@dataclass
class CalibrationResult:
    """What ``calibrate`` did: per layer the relative output error of the nearest symmetric
    (naive) weight and of the fitted one, on the same inputs."""

    samples: int
    data: str
    layers: dict[str, dict[str, float]]
    batchnorm: int  # BatchNorm layers whose statistics were re-estimated
    seconds: float
    damp: float = DEFAULT_DAMP

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "data": self.data, "damp": self.damp,
                "batchnorm_reestimated": self.batchnorm,
                "seconds": round(self.seconds, 2), "layers": self.layers}


# ----------------------------------------------------------------------------- calibrate


def calibrate(model: nn.Module, source_model: nn.Module, data_or_loader: Any, samples: int = 512, *,
              batch_size: int = 64, plan: Any = None, batchnorm: bool = True,
              max_iter: int = 50, tol: float = 1e-9, eigen_steps: int = 60,
              damp: float = DEFAULT_DAMP, device: str | torch.device | None = None,
              progress: bool | None = None, seed: int = 0) -> CalibrationResult:
    """Fit the converted layers of ``model`` (in place) to reproduce ``source_model``'s
    layer outputs on ``samples`` calibration inputs, layer after layer in forward order,
    then re-estimate BatchNorm statistics. ``source_model`` is the unconverted model of
    the same architecture (not changed). ``plan`` (the ``Plan`` of ``convert``), if given,
    gets ``output_error`` / ``output_error_naive`` per converted layer and a
    ``calibration`` record. ``damp`` pulls each fit towards the nearest symmetric weight
    (``damp`` × the layer's mean input energy × ‖W − W₀‖²; 0 is plain least squares), which
    keeps a few hundred samples from being over-fitted. Each fit's conjugate gradients stop
    after ``max_iter`` steps or when the residual falls under ``tol`` × its start. Returns a
    ``CalibrationResult``."""
    if not (math.isfinite(damp) and damp >= 0):
        raise CalibrationError(f"--calibration-damp must be a finite number >= 0, got {damp}.")
    opts = SolveOptions(max_iter=max_iter, tol=tol, eigen_steps=eigen_steps, damp=damp)
    start = time.perf_counter()
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)
    batches = calibration_batches(data_or_loader, samples, model=source_model,
                                  batch_size=batch_size, seed=seed)
    n = sum(len(b) for b in batches)
    units = _units(model)
    layers: dict[str, dict[str, Any]] = {}
    for unit in [u for u in units if not _fittable(u)]:
        # e.g. nn.MultiheadAttention's in_proj_weight (called functionally inside the
        # attention): kept at the nearest symmetric weight, and the record says so
        units.remove(unit)
        layers[unit.name] = {"output_error": None, "output_error_naive": None,
                             "note": f"not fitted ({type(unit.module).__name__.replace('Parametrized', '')}"
                                     f".{unit.tensor}): kept at the nearest symmetric weight"}
    src_modules = dict(source_model.named_modules())
    with _calibration_mode(model, source_model):
        if units:
            units, calls = _forward_order(model, units, batches[0], device)
        bar = _Progress(len(units), progress, "calibrate")
        try:
            for unit in units:
                for s in unit.sites:
                    if s not in src_modules:
                        raise CalibrationError(f"the source model has no layer {s!r}: "
                                               "calibration needs the unconverted model of the same architecture.")
                if isinstance(unit.module, nn.MultiheadAttention):
                    record = _fit_mha(model, source_model, unit, calls, batches, device,
                                      opts)
                elif isinstance(unit.module, nn.RNNBase):
                    record = _fit_rnn(model, source_model, unit, batches, device, opts)
                else:
                    record = _fit_unit(model, source_model, unit, calls, batches, device, opts)
                layers[unit.name] = record
                bar.step(unit.name, record.get("output_error_naive"), record.get("output_error"))
        finally:
            bar.close()
    bn = reestimate_batchnorm(model, batches, device) if batchnorm else 0
    result = CalibrationResult(samples=n, data=_data_text(data_or_loader), layers=layers, batchnorm=bn,
                               seconds=time.perf_counter() - start, damp=damp)
    if plan is not None:
        annotate_plan(plan, result)
    return result


def annotate_plan(plan: Any, result: CalibrationResult) -> None:
    """Write the per-layer output errors and the calibration record into ``plan``."""
    for entry in plan.layers:
        rec = result.layers.get(entry.name)
        if rec is not None:
            entry.output_error = rec.get("output_error")
            entry.output_error_naive = rec.get("output_error_naive")
    plan.calibration = {k: v for k, v in result.to_dict().items() if k != "layers"}


# ----------------------------------------------------------------------------- BatchNorm


def reestimate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor],
                         device: torch.device | str = "cpu") -> int:
    """Recompute every BatchNorm's running mean/var as the plain average over
    ``batches`` (the rest of the model in eval mode). Returns the number of layers."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats]
    if not bns:
        return 0
    modes = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in bns]
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
            m.train()
        with torch.no_grad():
            for x in batches:
                model(x.to(device))
    finally:
        for m, mom in momenta:
            m.momentum = mom
        for m, mode in modes:
            m.training = mode
    return len(bns)


# ----------------------------------------------------------------------------- costs for auto


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
    from symconvert.surgery.layers import handler_for
    from symconvert.surgery.selection import head_names

    schemes = [get_scheme(s) for s in candidates]
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)
    batches = calibration_batches(data_or_loader, samples, model=model, batch_size=batch_size)
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
    moments: dict[str, _Moments] = {}
    handles = []
    for name, (module, _) in todo.items():
        bias = getattr(module, "bias", None)
        moments[name] = _Moments(bias is not None)

        def hook(mod, args, out, _name=name):
            xs, ys = _layer_io(mod, args[0].detach(), out.detach())
            moments[_name].add(xs, ys)
        handles.append(module.register_forward_hook(hook))
    try:
        with _calibration_mode(model):
            for x in batches:
                _run(model, x, device)
    finally:
        for h in handles:
            h.remove()
    opts = SolveOptions(max_iter=max_iter, tol=tol, eigen_steps=eigen_steps, damp=damp)
    costs: dict[tuple[str, str], float] = {}
    for name, (module, ok) in todo.items():
        mom = moments[name]
        if mom.h is None:
            continue
        w = module.weight.detach().double()
        b = module.bias.detach().double() if module.bias is not None else None
        cg = module.groups if _is_conv(module) else 1
        for scheme in ok:
            fitter = _Fitter(scheme, tuple(w.shape), cg, cg, b is not None)
            p0 = scheme.pack(w, cg)
            naive = relative_error(fitter.wb(p0, b), mom)
            p, bb = fitter.solve(p0, b, mom, opts)
            costs[(name, scheme.spec)] = min(naive, relative_error(fitter.wb(p, bb), mom))
    return costs


# ----------------------------------------------------------------------------- convert


def convert_calibrated(model: nn.Module, scheme: str | Scheme, data_or_loader: Any,
                       samples: int = 512, *, target_reduction: float | None = None,
                       progress: bool | None = None, schemes=None, costs=None,
                       damp: float = DEFAULT_DAMP, **selection: Any):
    """``convert`` + ``calibrate`` (what ``convert(..., calibrate=DATA)`` runs). With
    ``target_reduction`` the layers are ranked by their least-squares output error on the
    calibration data (``calibrated_costs``) rather than by the weight error; with
    ``scheme="auto"`` those errors (squared, the planner's scale) are the per-layer costs."""
    import copy

    from symconvert.surgery.auto import is_auto, require_reachable
    from symconvert.surgery.convert import apply_plan, inspect
    from symconvert.surgery.plan import _apply_target, require_nonempty

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
            _apply_target(plan, target_reduction, errors=errors)
            plan.target_reduction = target_reduction
    require_nonempty(plan, allow_empty)
    apply_plan(model, plan)
    calibrate(model, source, data_or_loader, samples, plan=plan, progress=progress, damp=damp)
    return model, plan


def calibration_record(plan: Any) -> dict[str, Any]:
    """What a model directory records of its calibration (``symconvert.json`` key
    ``calibration``): the run's settings and per layer the naive and fitted output error."""
    return {**(getattr(plan, "calibration", None) or {}), "layers": {
        e.name: {"output_error": e.output_error, "output_error_naive": e.output_error_naive}
        for e in plan.converted}}


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
    import copy

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
            from symconvert.surgery.rnn import refresh_flat_weights

            refresh_flat_weights(m)
    return out
