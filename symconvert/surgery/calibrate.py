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
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from symconvert.errors import SymconvertError
from symconvert.schemes import Scheme, get_scheme
from symconvert.surgery.parametrization import converted_tensors, symmetric_of

__all__ = ["CalibrationResult", "calibrate", "calibrated_costs", "calibration_batches",
           "reestimate_batchnorm"]


class CalibrationError(SymconvertError):
    """Calibration cannot run on this model/data (exit code 2 on the CLI)."""


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


# ----------------------------------------------------------------------------- hooks / forward


class _Stop(Exception):
    """Raised by a hook once it has what it needs: the rest of the forward is skipped."""


@contextlib.contextmanager
def _calibration_mode(*models: nn.Module) -> Iterator[None]:
    """Eval mode, no fused transformer fast path, and nn.MultiheadAttention calling its
    ``out_proj`` as a module (so hooks on it fire), for the duration."""
    fast = torch.backends.mha.get_fastpath_enabled()
    modes = [(m, m.training) for model in models for m in model.modules()]
    patched: list[nn.Module] = []
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        for model in models:
            model.eval()
            for m in model.modules():
                if isinstance(m, nn.MultiheadAttention) and "forward" not in vars(m):
                    m.forward = _mha_forward.__get__(m)  # type: ignore[method-assign]
                    patched.append(m)
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
        for m in patched:
            del m.forward
        for m, mode in modes:
            m.training = mode


def _mha_forward(self: nn.MultiheadAttention, query, key, value, key_padding_mask=None,
                 need_weights=True, attn_mask=None, average_attn_weights=True, is_causal=False):
    """nn.MultiheadAttention.forward with the output projection applied by calling the
    ``out_proj`` module (torch applies it functionally inside the attention kernel)."""
    eye = torch.eye(self.embed_dim, dtype=query.dtype, device=query.device)
    zero = torch.zeros(self.embed_dim, dtype=query.dtype, device=query.device)
    batch_first = self.batch_first
    if batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    kwargs = {}
    if not self._qkv_same_embed_dim:
        kwargs = dict(use_separate_proj_weight=True, q_proj_weight=self.q_proj_weight,
                      k_proj_weight=self.k_proj_weight, v_proj_weight=self.v_proj_weight)
    attn, weights = F.multi_head_attention_forward(
        query, key, value, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias,
        self.bias_k, self.bias_v, self.add_zero_attn, self.dropout, eye, zero,
        training=self.training, key_padding_mask=key_padding_mask, need_weights=need_weights,
        attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal,
        **kwargs)
    out = self.out_proj(attn)
    if batch_first:
        out = out.transpose(0, 1)
    return out, weights


def _run(model: nn.Module, x: torch.Tensor, device: torch.device) -> None:
    try:
        with torch.no_grad():
            model(x.to(device))
    except _Stop:
        pass


# ----------------------------------------------------------------------------- units


@dataclass
class _Unit:
    """One converted tensor (shared by its tied aliases) and the module calls that use it."""

    name: str  # the plan's layer name
    module_name: str
    tensor: str
    module: nn.Module
    sym: Any
    sites: list[str] = field(default_factory=list)  # modules whose calls use the tensor


def _units(model: nn.Module) -> list[_Unit]:
    units: dict[int, _Unit] = {}
    for name, module, tensor, sym in converted_tensors(model):
        plist = module.parametrizations[tensor]
        unit = units.get(id(plist))
        if unit is None:
            label = name if tensor == "weight" else f"{name}.{tensor}"
            unit = units[id(plist)] = _Unit(label, name, tensor, module, sym)
        unit.sites.append(name)
    return list(units.values())


def _forward_order(model: nn.Module, units: list[_Unit], x: torch.Tensor,
                   device: torch.device) -> tuple[list[_Unit], dict[str, int]]:
    """Units sorted by their first call in a forward pass, and each site's calls per pass."""
    order: dict[str, int] = {}
    calls: dict[str, int] = {}
    handles = []
    names = {s for u in units for s in u.sites}
    for name, module in model.named_modules():
        if name in names:
            def hook(mod, args, _name=name):
                calls[_name] = calls.get(_name, 0) + 1
                order.setdefault(_name, len(order))
            handles.append(module.register_forward_pre_hook(hook))
    try:
        _run(model, x[:2], device)
    finally:
        for h in handles:
            h.remove()
    never = [u.name for u in units if not any(s in order for s in u.sites)]
    if never:
        raise CalibrationError(
            f"converted layer(s) never called by the model's forward: {', '.join(never[:5])}; "
            "cannot calibrate them.")
    key = {u.name: min(order[s] for s in u.sites if s in order) for u in units}
    return sorted(units, key=lambda u: (key[u.name], _rnn_rank(u))), calls


def _rnn_rank(unit: _Unit) -> tuple[int, int, int]:
    """Inside one recurrent module: layer by layer, input weights before recurrent ones
    (the recurrent fit sees the hidden states the fitted input weights produce)."""
    if not isinstance(unit.module, nn.RNNBase):
        return (0, 0, 0)
    kind, _, rest = unit.tensor.partition("_l")
    layer, _, direction = rest.partition("_")
    return (int(layer), 0 if kind == "weight_ih" else 1, 1 if direction else 0)


# ----------------------------------------------------------------------------- layer views


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd)


def _conv_columns(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """im2col of a conv input: [groups, rows, in/groups * prod(kernel)] (rows = batch x
    output positions), matching ``weight.reshape(out, -1)`` of each group."""
    nd = x.dim() - 2
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    else:
        pad = []
        for p in reversed(module.padding):
            pad += [p, p]
        if any(pad):
            x = F.pad(x, pad)
    b, c = x.shape[:2]
    for d in range(nd):
        k, s, dil = module.kernel_size[d], module.stride[d], module.dilation[d]
        span = (k - 1) * dil + 1
        x = x.unfold(2 + d, span, s)  # appends a window dim of size span
        if dil > 1:
            x = x[..., ::dil]
    # x: [b, c, o_1..o_nd, k_1..k_nd]
    g = module.groups
    out_pos = x.shape[2 : 2 + nd]
    perm = [0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)]
    cols = x.permute(perm).reshape(b * math.prod(out_pos), g, (c // g) * math.prod(module.kernel_size))
    return cols.transpose(0, 1)


def _conv_targets(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """Conv output [b, out, positions...] -> [groups, rows, out/groups]."""
    b, o = y.shape[:2]
    g = module.groups
    return y.reshape(b, o, -1).permute(0, 2, 1).reshape(-1, g, o // g).transpose(0, 1)


class _Moments:
    """Float64 sums over rows: H = Σ x xᵀ (per group), C = Σ y xᵀ, ||y||², row count. The
    input gets a trailing constant 1 when the layer has a bias (fitted with the weight)."""

    def __init__(self, bias: bool) -> None:
        self.bias = bias
        self.h: torch.Tensor | None = None
        self.c: torch.Tensor | None = None
        self.yy = 0.0
        self.rows = 0

    def add(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        # x [g, rows, d], y [g, rows, m]; chunked so the float64 copy stays small
        g, rows, d = x.shape
        step = max(1, (1 << 24) // max(1, g * (d + 1)))
        for start in range(0, rows, step):
            xs = x[:, start : start + step].double()
            if self.bias:
                xs = torch.cat([xs, xs.new_ones(g, xs.shape[1], 1)], dim=2)
            h = xs.transpose(1, 2) @ xs
            self.h = h if self.h is None else self.h.add_(h)
            if y is not None:
                ys = y[:, start : start + step].double()
                c = ys.transpose(1, 2) @ xs
                self.c = c if self.c is None else self.c.add_(c)
                self.yy += float(ys.pow(2).sum())
        self.rows += rows


def _layer_io(module: nn.Module, x: torch.Tensor, y: torch.Tensor | None):
    """(inputs [g, rows, d], targets [g, rows, m]) of a conv/linear call."""
    if _is_conv(module):
        return _conv_columns(module, x), (None if y is None else _conv_targets(module, y))
    xs = x.reshape(1, -1, x.shape[-1])
    return xs, (None if y is None else y.reshape(1, -1, y.shape[-1]))


# ----------------------------------------------------------------------------- the solve


def _weight_view(w: torch.Tensor, groups: int) -> torch.Tensor:
    """Dense weight [out, in/g, k...] -> [g, out/g, in/g * prod(k)]."""
    return w.reshape(groups, w.shape[0] // groups, -1)


def _objective(wb: torch.Tensor, h: torch.Tensor, c: torch.Tensor, yy: float) -> torch.Tensor:
    """||[W|b] X - Y||² from the moments (wb: [g, m, d])."""
    return (torch.einsum("gmd,gde,gme->", wb, h, wb) - 2 * (wb * c).sum() + yy)


def relative_error(wb: torch.Tensor, mom: _Moments) -> float:
    if mom.yy <= 0:
        return 0.0
    return math.sqrt(max(float(_objective(wb, mom.h, mom.c, mom.yy)), 0.0) / mom.yy)


class _Fitter:
    """The least-squares fit of one tensor in a scheme's packed space."""

    def __init__(self, scheme: Scheme, shape: tuple[int, ...], groups: int, conv_groups: int,
                 has_bias: bool) -> None:
        self.scheme, self.shape, self.groups = scheme, tuple(shape), groups
        self.cg = conv_groups  # groups of the moment matrices (conv groups; 1 for linear)
        self.has_bias = has_bias
        self.iterations = 0  # CG steps (or L-BFGS evaluations) of the last solve

    def wb(self, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        w = _weight_view(self.scheme.unpack(packed, self.shape, self.groups), self.cg)
        if self.has_bias:
            w = torch.cat([w, bias.reshape(self.cg, -1, 1)], dim=2)
        return w

    def solve(self, p0: torch.Tensor, b0: torch.Tensor | None, mom: _Moments, *,
              max_iter: int = 50, tol: float = 1e-9, ridge: float = 1e-12,
              eigen_steps: int = 60) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = mom.h
        scale = h.diagonal(dim1=1, dim2=2).mean().clamp_min(1e-30)
        h = h + ridge * scale * torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
        c = mom.c
        p0 = p0.detach().double()
        b0 = None if b0 is None else b0.detach().double()
        if self.scheme.name == "eigen":
            return self._lbfgs(p0, b0, h, c, mom.yy, eigen_steps)
        return self._cg(p0, b0, h, c, max_iter, tol)

    # -- linear schemes: preconditioned CG on the normal equations
    def _adjoint(self, g: torch.Tensor, like_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Jᵀ g: the packed-space (and bias) image of a [g, m, d] weight-space tensor."""
        p = torch.zeros_like(like_p, requires_grad=True)
        with torch.enable_grad():
            w = _weight_view(self.scheme.unpack(p, self.shape, self.groups), self.cg)
            d_w = w.shape[2]
            (gp,) = torch.autograd.grad(w, p, grad_outputs=g[:, :, :d_w].contiguous())
        gb = g[:, :, d_w].reshape(-1).clone() if self.has_bias else None
        return gp, gb

    def _cg(self, p0, b0, h, c, max_iter, tol):
        def apply(p, b):
            return self._adjoint(self.wb(p, b) @ h, p0)

        def dot(a, b):
            return sum(float((x * y).sum()) for x, y in zip(a, b, strict=True) if x is not None)

        def axpy(alpha, x, y):  # y + alpha x
            return tuple(None if yi is None else yi + alpha * xi for xi, yi in zip(x, y, strict=True))

        rhs = self._adjoint(c, p0)
        # Preconditioner: the unconstrained solve W H⁻¹ seen through the scheme,
        # z = D⁻¹ Jᵀ((J D⁻¹ r) H⁻¹) with D = JᵀJ (orbit sizes): symmetric positive definite,
        # exact without the constraint, so CG needs few steps whatever H's conditioning.
        count = self._adjoint(torch.ones_like(c), p0)
        inv_d = tuple(None if t is None else 1.0 / t.clamp_min(1e-30) for t in count)
        eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
        scale = h.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-30)[:, None, None]
        chol, info = torch.linalg.cholesky_ex(h + 1e-8 * scale * eye)
        if bool((info != 0).any()):
            chol = torch.linalg.cholesky(h + 1e-4 * scale * eye)

        def precondition(r):
            u = tuple(None if ri is None else ri * di for ri, di in zip(r, inv_d, strict=True))
            w = self.wb(*u)  # [g, m, d]
            v = torch.cholesky_solve(w.transpose(1, 2), chol).transpose(1, 2)
            z = self._adjoint(v.contiguous(), p0)
            return tuple(None if zi is None else zi * di for zi, di in zip(z, inv_d, strict=True))

        x = (p0, b0)
        ax = apply(*x)
        r = axpy(-1.0, ax, rhs)
        z = precondition(r)
        d = z
        rz = dot(r, z)
        r0 = math.sqrt(max(dot(rhs, rhs), 1e-300))
        self.iterations = 0
        for _ in range(max_iter):
            if math.sqrt(max(dot(r, r), 0.0)) <= tol * r0:
                break
            self.iterations += 1
            ad = apply(*d)
            dad = dot(d, ad)
            if dad <= 0:
                break
            alpha = rz / dad
            x = axpy(alpha, d, x)
            r = axpy(-alpha, ad, r)
            z = precondition(r)
            rz_new = dot(r, z)
            beta = rz_new / max(rz, 1e-300)
            rz = rz_new
            d = tuple(None if zi is None else zi + beta * di for zi, di in zip(z, d, strict=True))
        return x

    # -- eigen:K: the unpack is not linear; L-BFGS on the same quadratic objective
    def _lbfgs(self, p0, b0, h, c, yy, steps):
        p = p0.clone().requires_grad_(True)
        params = [p]
        b = None
        if self.has_bias:
            b = b0.clone().requires_grad_(True)
            params.append(b)
        norm = max(yy, 1e-30)
        opt = torch.optim.LBFGS(params, lr=1.0, max_iter=steps, history_size=20,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = _objective(self.wb(p, b), h, c, yy) / norm
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        self.iterations = int(opt.state[opt._params[0]].get("func_evals", 0))
        return p.detach(), (None if b is None else b.detach())


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

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "data": self.data, "batchnorm_reestimated": self.batchnorm,
                "seconds": round(self.seconds, 2), "layers": self.layers}


# ----------------------------------------------------------------------------- calibrate


def calibrate(model: nn.Module, source_model: nn.Module, data_or_loader: Any, samples: int = 512, *,
              batch_size: int = 64, plan: Any = None, batchnorm: bool = True,
              max_iter: int = 50, tol: float = 1e-9, eigen_steps: int = 60,
              device: str | torch.device | None = None, progress: bool | None = None,
              seed: int = 0) -> CalibrationResult:
    """Fit the converted layers of ``model`` (in place) to reproduce ``source_model``'s
    layer outputs on ``samples`` calibration inputs, layer after layer in forward order,
    then re-estimate BatchNorm statistics. ``source_model`` is the unconverted model of
    the same architecture (not changed). ``plan`` (the ``Plan`` of ``convert``), if given,
    gets ``output_error`` / ``output_error_naive`` per converted layer and a
    ``calibration`` record. Returns a ``CalibrationResult``."""
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
                if isinstance(unit.module, nn.RNNBase):
                    record = _fit_rnn(model, source_model, unit, batches, device, max_iter, tol,
                                      eigen_steps)
                else:
                    record = _fit_unit(model, source_model, unit, calls, batches, device, max_iter,
                                       tol, eigen_steps)
                layers[unit.name] = record
                bar.step(unit.name, record.get("output_error_naive"), record.get("output_error"))
        finally:
            bar.close()
    bn = reestimate_batchnorm(model, batches, device) if batchnorm else 0
    result = CalibrationResult(samples=n, data=_data_text(data_or_loader), layers=layers, batchnorm=bn,
                               seconds=time.perf_counter() - start)
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


def _packed(unit: _Unit) -> torch.Tensor:
    return unit.module.parametrizations[unit.tensor].original


def _fittable(unit: _Unit) -> bool:
    """Layers calibration fits: conv/linear weights and LSTM/GRU gate blocks."""
    if isinstance(unit.module, nn.RNNBase):
        return True
    return isinstance(unit.module, (nn.Linear, nn.modules.conv._ConvNd)) and unit.tensor == "weight"


def _fit_unit(model, source_model, unit: _Unit, calls: dict[str, int], batches, device,
              max_iter, tol, eigen_steps) -> dict[str, float]:
    module = unit.module
    if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or unit.tensor != "weight":
        raise CalibrationError(f"{unit.name}: calibration supports conv, linear and LSTM/GRU layers, "
                               f"not {type(module).__name__}.{unit.tensor}.")
    bias = getattr(module, "bias", None)
    has_bias = bias is not None and isinstance(bias, nn.Parameter)
    conv_groups = module.groups if _is_conv(module) else 1
    mom = _Moments(has_bias)
    sites = unit.sites
    once = len(sites) == 1 and calls.get(sites[0], 0) == 1
    conv_mods = dict(model.named_modules())
    src_mods = dict(source_model.named_modules())
    for x in batches:
        got_x: list[tuple[str, torch.Tensor]] = []
        got_y: list[tuple[str, torch.Tensor]] = []
        handles = []
        for s in sites:
            def pre(mod, args, _s=s, _got=got_x):
                _got.append((_s, args[0].detach()))
                if once:
                    raise _Stop

            def post(mod, args, out, _s=s, _got=got_y):
                _got.append((_s, (out[0] if isinstance(out, tuple) else out).detach()))
                if once:
                    raise _Stop
            handles.append(conv_mods[s].register_forward_pre_hook(pre))
            handles.append(src_mods[s].register_forward_hook(post))
        try:
            _run(model, x, device)
            _run(source_model, x, device)
        finally:
            for h in handles:
                h.remove()
        if len(got_x) != len(got_y):
            raise CalibrationError(f"{unit.name}: the converted and source models call the layer "
                                   "a different number of times.")
        for (_, xi), (_, yi) in zip(got_x, got_y, strict=True):
            xs, ys = _layer_io(module, xi, yi)
            mom.add(xs, ys)
    scheme = unit.sym.scheme
    fitter = _Fitter(scheme, unit.sym.shape, unit.sym.groups, conv_groups, has_bias)
    src_w = src_mods[sites[0]].weight.detach().double()
    src_b = src_mods[sites[0]].bias.detach().double() if has_bias else None
    naive_p = scheme.pack(src_w, unit.sym.groups)
    naive = relative_error(fitter.wb(naive_p, src_b), mom)
    p, b = fitter.solve(naive_p, src_b, mom, max_iter=max_iter, tol=tol, eigen_steps=eigen_steps)
    fitted = relative_error(fitter.wb(p, b), mom)
    if fitted > naive:  # never worse than where it started (an unconverged eigen fit)
        p, b, fitted = naive_p, src_b, naive
    with torch.no_grad():
        packed = _packed(unit)
        packed.copy_(p.to(packed.dtype))
        if has_bias:
            module.bias.copy_(b.to(module.bias.dtype))
    return {"output_error_naive": naive, "output_error": fitted, "iterations": fitter.iterations}


# ----------------------------------------------------------------------------- RNN


def _rnn_layer_io(rnn: nn.RNNBase, layer: int, x: torch.Tensor, hx) -> tuple[list, torch.Tensor, Any]:
    """Run layer ``layer`` of ``rnn`` alone on its input sequence ``x`` ([T, B, I], time
    first). Returns, per direction, (inputs [T*B, I], previous hidden states [T*B, H]),
    the layer's output sequence and nothing else."""
    mode = rnn.mode
    dirs = 2 if rnn.bidirectional else 1
    cls = {"LSTM": nn.LSTM, "GRU": nn.GRU}.get(mode)
    if cls is not None:
        single = cls(x.shape[-1], rnn.hidden_size, num_layers=1, bias=rnn.bias,
                     bidirectional=rnn.bidirectional)
    else:
        single = nn.RNN(x.shape[-1], rnn.hidden_size, num_layers=1, bias=rnn.bias,
                        nonlinearity="tanh" if mode == "RNN_TANH" else "relu",
                        bidirectional=rnn.bidirectional)
    single = single.to(x.device, x.dtype)
    with torch.no_grad():
        for suffix in ("", "_reverse")[:dirs]:
            for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                src = getattr(rnn, f"{kind}_l{layer}{suffix}", None)
                if src is not None:
                    getattr(single, f"{kind}_l0{suffix}").copy_(src)
    h0 = None
    if hx is not None:
        if mode == "LSTM":
            h0 = tuple(t[layer * dirs : (layer + 1) * dirs] for t in hx)
        else:
            h0 = hx[layer * dirs : (layer + 1) * dirs]
    with torch.no_grad():
        out, _ = single(x, h0)
    t, b = x.shape[:2]
    hid = rnn.hidden_size
    per_dir = []
    for d in range(dirs):
        hseq = out[..., d * hid : (d + 1) * hid]
        init = (h0[0] if mode == "LSTM" else h0)[d] if h0 is not None else x.new_zeros(b, hid)
        if d == 0:
            prev = torch.cat([init[None], hseq[:-1]], 0)
        else:  # the reverse direction's previous state is the next time step's
            prev = torch.cat([hseq[1:], init[None]], 0)
        per_dir.append((x.reshape(t * b, -1), prev.reshape(t * b, hid)))
    return per_dir, out


def _rnn_inputs(rnn: nn.RNNBase, args, kwargs) -> tuple[torch.Tensor, Any]:
    x = args[0]
    if isinstance(x, nn.utils.rnn.PackedSequence):
        raise CalibrationError("calibration of recurrent layers fed PackedSequence is not supported.")
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    if rnn.batch_first:
        x = x.transpose(0, 1)
    if x.dim() == 2:  # unbatched
        x = x[:, None]
        if hx is not None:
            hx = tuple(t[:, None] for t in hx) if isinstance(hx, tuple) else hx[:, None]
    return x, hx


def _fit_rnn(model, source_model, unit: _Unit, batches, device, max_iter, tol,
             eigen_steps) -> dict[str, float]:
    """Fit one gate-weight tensor of an LSTM/GRU/RNN: ``weight_ih_l{k}`` on the layer's
    input sequence, ``weight_hh_l{k}`` on the previous hidden states, the target being the
    source's gate pre-activations (W x + b) on the source's own sequences."""
    rnn = unit.module
    if getattr(rnn, "proj_size", 0):
        raise CalibrationError(f"{unit.name}: LSTM with proj_size cannot be calibrated.")
    name = unit.tensor  # weight_hh_l1_reverse
    kind, _, rest = name.partition("_l")
    layer_text, _, direction = rest.partition("_")
    layer, d = int(layer_text), (1 if direction == "reverse" else 0)
    src_rnn = dict(source_model.named_modules())[unit.module_name]
    suffix = "_reverse" if d else ""
    bias_name = ("bias_ih" if kind == "weight_ih" else "bias_hh") + f"_l{layer}{suffix}"
    has_bias = rnn.bias
    mom = _Moments(has_bias)
    for x in batches:
        got: dict[str, tuple] = {}

        def grab(tag, _got=got):
            def pre(mod, args, kwargs):
                _got[tag] = _rnn_inputs(mod, args, kwargs)
                raise _Stop
            return pre

        h1 = rnn.register_forward_pre_hook(grab("conv"), with_kwargs=True)
        h2 = src_rnn.register_forward_pre_hook(grab("src"), with_kwargs=True)
        try:
            _run(model, x, device)
            _run(source_model, x, device)
        finally:
            h1.remove()
            h2.remove()
        xc, hc = got["conv"]
        xs, hs = got["src"]
        for k in range(layer + 1):
            ioc, xc_next = _rnn_layer_io(rnn, k, xc, hc)
            ios, xs_next = _rnn_layer_io(src_rnn, k, xs, hs)
            if k < layer:
                xc, xs = xc_next, xs_next
        pick = 0 if kind == "weight_ih" else 1
        inp_c = ioc[d][pick]
        inp_s = ios[d][pick]
        w_s = getattr(src_rnn, f"{kind}_l{layer}{suffix}").detach()
        y = inp_s @ w_s.t()
        if has_bias:
            y = y + getattr(src_rnn, bias_name).detach()
        mom.add(inp_c[None], y[None])
    scheme = unit.sym.scheme
    fitter = _Fitter(scheme, unit.sym.shape, unit.sym.groups, 1, has_bias)
    src_w = getattr(src_rnn, f"{kind}_l{layer}{suffix}").detach().double()
    src_b = getattr(src_rnn, bias_name).detach().double() if has_bias else None
    naive_p = scheme.pack(src_w, unit.sym.groups)
    naive = relative_error(fitter.wb(naive_p, src_b), mom)
    p, b = fitter.solve(naive_p, src_b, mom, max_iter=max_iter, tol=tol, eigen_steps=eigen_steps)
    fitted = relative_error(fitter.wb(p, b), mom)
    if fitted > naive:
        p, b, fitted = naive_p, src_b, naive
    with torch.no_grad():
        _packed(unit).copy_(p.to(_packed(unit).dtype))
        if has_bias:
            getattr(rnn, bias_name).copy_(b.to(getattr(rnn, bias_name).dtype))
    from symconvert.surgery.rnn import refresh_flat_weights

    refresh_flat_weights(rnn)
    return {"output_error_naive": naive, "output_error": fitted}


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
            p, bb = fitter.solve(p0, b, mom, max_iter=max_iter, tol=tol, eigen_steps=eigen_steps)
            costs[(name, scheme.spec)] = min(naive, relative_error(fitter.wb(p, bb), mom))
    return costs


# ----------------------------------------------------------------------------- convert


def convert_calibrated(model: nn.Module, scheme: str | Scheme, data_or_loader: Any,
                       samples: int = 512, *, target_reduction: float | None = None,
                       progress: bool | None = None, schemes=None, costs=None,
                       **selection: Any):
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
            costs = _auto_costs(source, data_or_loader, samples, include_head)
        plan = inspect(model, scheme, allow_empty=True, target_reduction=target_reduction,
                       schemes=schemes, costs=costs, **selection)
        require_reachable(plan)
    else:
        plan = inspect(model, scheme, allow_empty=True, target_reduction=None,
                       _with_error=True, **selection)
        if target_reduction is not None:
            spec = get_scheme(scheme).spec
            table = calibrated_costs(source, data_or_loader, [spec], samples,
                                     include_head=include_head)
            errors = {name: err for (name, s), err in table.items() if s == spec}
            _apply_target(plan, target_reduction, errors=errors)
            plan.target_reduction = target_reduction
    require_nonempty(plan, allow_empty)
    apply_plan(model, plan)
    calibrate(model, source, data_or_loader, samples, plan=plan, progress=progress)
    return model, plan


def calibration_record(plan: Any) -> dict[str, Any]:
    """What a model directory records of its calibration (``symconvert.json`` key
    ``calibration``): the run's settings and per layer the naive and fitted output error."""
    return {**(getattr(plan, "calibration", None) or {}), "layers": {
        e.name: {"output_error": e.output_error, "output_error_naive": e.output_error_naive}
        for e in plan.converted}}


def _auto_costs(source: nn.Module, data_or_loader: Any, samples: int, include_head: bool):
    """The ``--scheme auto`` cost function of a calibrated conversion: the squared relative
    output error after the least-squares fit, for every (layer, scheme) pair calibration
    prices (conv and linear); the planner falls back to the weight error for the others."""

    def costs(pairs: list[tuple[str, str]]) -> dict[tuple[str, str], float]:
        specs = sorted({s for _, s in pairs})
        table = calibrated_costs(source, data_or_loader, specs, samples,
                                 include_head=include_head)
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
