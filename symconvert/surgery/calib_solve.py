"""Calibration solvers (``symconvert.surgery.calibrate``): the least-squares fit of one layer
in its scheme's packed space (preconditioned conjugate gradients on the normal equations, or
L-BFGS for ``eigen:K``), and the per-unit fits of conv/linear weights and LSTM/GRU/RNN gate
blocks that feed it their accumulated moments."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from symconvert.schemes import Scheme
from symconvert.surgery.calib_direct import TapSolver, eliminate_bias, tap_layout
from symconvert.surgery.calib_moments import (
    MHA_INPUTS,
    CalibrationError,
    Feed,
    Moments,
    Stop,
    Unit,
    is_conv,
    packed_of,
)
from symconvert.surgery.rnn import refresh_flat_weights

# ----------------------------------------------------------------------------- the solve

# Default damping of every fit: + DEFAULT_DAMP · mean(diag H) · ‖[W|b] − [W₀|b₀]‖², W₀ the
# nearest symmetric weight. Measured on the pretrained Fashion-MNIST test models (README):
# without it the fit over-fits its 512 samples (fashion_vit `block`: 81.7 % calibrated, and a
# default fine-tune then ends lower, 80.6 %); with 0.01 it scores 84.4 %, then 84.6 %.
DEFAULT_DAMP = 0.01


@dataclass(frozen=True)
class SolveOptions:
    """How far each layer's fit is taken: CG steps and its stopping test (residual
    ``tol``), L-BFGS evaluations for ``eigen:K`` and the damping."""

    max_iter: int = 50
    tol: float = 1e-9
    eigen_steps: int = 60
    damp: float = DEFAULT_DAMP
    #: stop when the estimated distance to the optimum (rᵀM⁻¹r) is under this fraction of
    #: the current squared output error, i.e. the relative error is within it of its optimum
    rel_tol: float = 2e-4
    #: a conv/linear fit's moments from a seeded uniform sample of at most this many rows
    #: (positions × images) per input dimension; None: every row. Early convs see thousands
    #: of rows per dimension, where the moments' cost (rows × d²) dominated calibration.
    rows_per_dim: int | None = 32


def _weight_view(w: torch.Tensor, groups: int) -> torch.Tensor:
    """Dense weight [out, in/g, k...] -> [g, out/g, in/g * prod(k)]."""
    return w.reshape(groups, w.shape[0] // groups, -1)


def _objective(wb: torch.Tensor, h: torch.Tensor, c: torch.Tensor, yy: float) -> torch.Tensor:
    """||[W|b] X - Y||² from the moments (wb: [g, m, d])."""
    return (torch.einsum("gmd,gde,gme->", wb, h, wb) - 2 * (wb * c).sum() + yy)


def relative_error(wb: torch.Tensor, mom: Moments) -> float:
    if mom.yy <= 0:
        return 0.0
    return math.sqrt(max(float(_objective(wb, mom.h, mom.c, mom.yy)), 0.0) / mom.yy)


class Fitter:
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

    def solve(self, p0: torch.Tensor, b0: torch.Tensor | None, mom: Moments,
              opts: SolveOptions = SolveOptions(), *,
              ridge: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = mom.h
        scale = h.diagonal(dim1=1, dim2=2).mean().clamp_min(1e-30)
        p0 = p0.detach().double()
        b0 = None if b0 is None else b0.detach().double()
        # damping: + damp·‖[W|b] − [W₀|b₀]‖² (scaled by H's mean diagonal), a pull towards
        # the nearest symmetric weight that keeps the fit from over-fitting the calibration
        # inputs along directions they barely excite (GPTQ's percdamp, centred on W₀)
        lam = opts.damp * scale
        h = h + (ridge * scale + lam) * torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
        wb0 = self.wb(p0, b0)
        c = mom.c + lam * wb0 if opts.damp > 0 else mom.c
        yy = mom.yy + float(lam * wb0.pow(2).sum()) if opts.damp > 0 else mom.yy
        if self.scheme.name == "eigen":
            return self._lbfgs(p0, b0, h, c, mom.yy, opts.eigen_steps)
        layout = tap_layout(self.scheme, self.shape, self.cg)
        if layout is not None:
            return self._direct(layout, p0, wb0, h, c, yy, opts)
        return self._cg(p0, b0, h, c, yy, opts)

    def _direct(self, layout, p0, wb0, h, c, yy, opts):
        """channel / stacked block: exact (one tap) or CG preconditioned per tap mode."""
        recover = None
        w0 = wb0
        if self.has_bias:
            h, c, yy, recover = eliminate_bias(h, c, yy)
            w0 = wb0[:, :, :-1]
        solver = TapSolver(*layout)
        w = solver.solve(h, c, yy, w0.contiguous(), max_iter=opts.max_iter, rel_tol=opts.rel_tol)
        self.iterations = solver.iterations
        p = self.scheme.pack(w.reshape(self.shape), self.groups).to(p0.dtype)
        return p, (recover(w) if recover is not None else None)

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

    def _cg(self, p0, b0, h, c, yy, opts):
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
        for _ in range(opts.max_iter):
            if math.sqrt(max(dot(r, r), 0.0)) <= opts.tol * r0:
                break
            # the squared error at x: xᵀAx − 2 bᵀx + yy = −xᵀ(r + b) + yy; rᵀz estimates
            # its distance to the optimum
            err = yy - dot(x, axpy(1.0, r, rhs))
            if rz <= opts.rel_tol * max(err, 1e-300):
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


def fit_unit(model, source_model, unit: Unit, calls: dict[str, int], feeds: list[Feed],
             opts: SolveOptions) -> dict[str, float]:
    """Fit a conv/linear weight: its input as the converted model feeds it, its target the
    source layer's output, over ``feeds`` (each runs both models, or both blocks, on one
    calibration batch)."""
    module = unit.module
    if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or unit.tensor != "weight":
        raise CalibrationError(f"{unit.name}: calibration supports conv, linear and LSTM/GRU layers, "
                               f"not {type(module).__name__}.{unit.tensor}.")
    bias = getattr(module, "bias", None)
    has_bias = bias is not None and isinstance(bias, nn.Parameter)
    conv_groups = module.groups if is_conv(module) else 1
    mom = Moments(has_bias, rows_per_dim=opts.rows_per_dim, calls=len(feeds) * len(unit.sites))
    sites = unit.sites
    once = len(sites) == 1 and calls.get(sites[0], 0) == 1
    conv_mods = dict(model.named_modules())
    src_mods = dict(source_model.named_modules())
    for feed in feeds:
        got_x: list[tuple[str, torch.Tensor]] = []
        got_y: list[tuple[str, torch.Tensor]] = []
        handles = []
        for s in sites:
            def pre(mod, args, _s=s, _got=got_x):
                _got.append((_s, args[0].detach()))
                if once:
                    raise Stop

            def post(mod, args, out, _s=s, _got=got_y, _stop=once and not feed.source_to_end):
                _got.append((_s, (out[0] if isinstance(out, tuple) else out).detach()))
                if _stop:
                    raise Stop
            handles.append(conv_mods[s].register_forward_pre_hook(pre))
            handles.append(src_mods[s].register_forward_hook(post))
        feed(handles)
        if len(got_x) != len(got_y):
            raise CalibrationError(f"{unit.name}: the converted and source models call the layer "
                                   "a different number of times.")
        for (_, xi), (_, yi) in zip(got_x, got_y, strict=True):
            mom.add_call(module, xi, yi)
    src = src_mods[sites[0]]
    return _solve_and_write(unit, mom, conv_groups, src.weight, src.bias if has_bias else None,
                            module.bias if has_bias else None, opts)


def _solve_and_write(unit: Unit, mom: Moments, conv_groups: int, src_w: torch.Tensor,
                     src_b: torch.Tensor | None, bias: torch.Tensor | None,
                     opts: SolveOptions) -> dict[str, float]:
    """Fit ``unit``'s packed tensor (and ``bias``, fitted with it when given) from the
    moments, starting at the nearest symmetric weight of the source's ``src_w``; write the
    fit into the model unless it is worse than that start. Returns the unit's record."""
    scheme = unit.sym.scheme
    fitter = Fitter(scheme, unit.sym.shape, unit.sym.groups, conv_groups, src_b is not None)
    src_w = src_w.detach().double()
    src_b = None if src_b is None else src_b.detach().double()
    naive_p = scheme.pack(src_w, unit.sym.groups)
    naive = relative_error(fitter.wb(naive_p, src_b), mom)
    p, b = fitter.solve(naive_p, src_b, mom, opts)
    fitted = relative_error(fitter.wb(p, b), mom)
    if fitted > naive:  # never worse than where it started (an unconverged eigen fit)
        p, b, fitted = naive_p, src_b, naive
    with torch.no_grad():
        packed = packed_of(unit)
        packed.copy_(p.to(packed.dtype))
        if bias is not None:
            bias.copy_(b.to(bias.dtype))
    return {"output_error_naive": naive, "output_error": fitted, "iterations": fitter.iterations}


# ----------------------------------------------------------------------------- attention


def _call_inputs(module, src_module, feed: Feed, read, stop: bool):
    """Run ``feed`` (both models on one batch) and return what ``read(module, args, kwargs)`` takes from every call
    of ``module`` (converted) and ``src_module`` (source); ``stop``: only the first call,
    the rest of each forward skipped."""
    got: tuple[list, list] = ([], [])
    handles = []
    for mod, out in ((module, got[0]), (src_module, got[1])):
        def pre(m, args, kwargs, _out=out):
            _out.append(read(m, args, kwargs))
            if stop:
                raise Stop
        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
    feed(handles)
    return got


def _mha_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(query, key, value) of an nn.MultiheadAttention call, positional or keyword."""
    names = ("query", "key", "value")
    got = list(args[:3]) + [kwargs.get(n) for n in names[len(args[:3]):]]
    return got[0], got[1], got[2]


def fit_mha(model, source_model, unit: Unit, calls: dict[str, int], feeds: list[Feed],
            opts: SolveOptions) -> dict[str, Any]:
    """Fit an input projection of nn.MultiheadAttention (``in_proj_weight``, or one of
    ``q/k/v_proj_weight``): a linear layer whose input is the attention's query (key,
    value) and whose target is the source's projection of its own input, bias included."""
    mha = unit.module
    src = dict(source_model.named_modules())[unit.module_name]
    e = mha.embed_dim
    which = MHA_INPUTS[unit.tensor]
    bias = mha.in_proj_bias
    if bias is not None and which is not None:
        bias = bias[which * e : (which + 1) * e]  # a view: the fit writes into in_proj_bias
    src_b = src.in_proj_bias
    if src_b is not None and which is not None:
        src_b = src_b[which * e : (which + 1) * e]
    src_w = getattr(src, unit.tensor).detach()
    once = calls.get(unit.module_name, 0) == 1
    mom = Moments(bias is not None)
    for feed in feeds:
        conv_calls, src_calls = _call_inputs(mha, src, feed,
                                             lambda m, args, kwargs: _mha_call(args, kwargs), once)
        if len(conv_calls) != len(src_calls):
            raise CalibrationError(f"{unit.name}: the converted and source models call the layer "
                                   "a different number of times.")
        for qkv_c, qkv_s in zip(conv_calls, src_calls, strict=True):
            if which is None and not (qkv_c[0] is qkv_c[1] is qkv_c[2]):
                return {"output_error": None, "output_error_naive": None,
                        "note": "not fitted (MultiheadAttention.in_proj_weight of a "
                                "cross-attention): kept at the nearest symmetric weight"}
            xc, xs = qkv_c[which or 0].detach(), qkv_s[which or 0].detach()
            y = F.linear(xs, src_w, None if src_b is None else src_b.detach())
            mom.add(xc.reshape(1, -1, xc.shape[-1]), y.reshape(1, -1, y.shape[-1]))
    return _solve_and_write(unit, mom, 1, src_w, src_b, bias, opts)


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


def fit_rnn(model, source_model, unit: Unit, feeds: list[Feed],
            opts: SolveOptions) -> dict[str, float]:
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
    mom = Moments(has_bias)
    for feed in feeds:
        conv_calls, src_calls = _call_inputs(rnn, src_rnn, feed, _rnn_inputs, True)
        xc, hc = conv_calls[0]
        xs, hs = src_calls[0]
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
    record = _solve_and_write(unit, mom, 1, w_s, getattr(src_rnn, bias_name) if has_bias else None,
                              getattr(rnn, bias_name) if has_bias else None, opts)
    refresh_flat_weights(rnn)
    return record

