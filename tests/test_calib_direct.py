"""Calibration's solvers against brute-force dense least squares (issue 19): the exact
Lyapunov solve (``channel`` on linear and 1 × 1 layers, ``block`` stacked along the output),
the Kronecker-preconditioned CG for k × k taps, and the generic CG of the other linear
schemes, each on small random layers (learning is not the point: the algebra is)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from symconvert.schemes import get_scheme
from symconvert.surgery.calib_direct import tap_layout
from symconvert.surgery.calib_moments import Moments, layer_io
from symconvert.surgery.calib_solve import Fitter, SolveOptions, relative_error


def _layer(shape, groups, bias):
    torch.manual_seed(0)
    if len(shape) > 2:
        layer = nn.Conv2d(shape[1] * groups, shape[0], shape[2:], groups=groups, bias=bias, padding=1)
        x = torch.randn(12, shape[1] * groups, 5, 5)
    else:
        layer = nn.Linear(shape[1], shape[0], bias=bias)
        x = torch.randn(48, shape[1])
    layer = layer.double()
    x = (x + 0.7 * torch.randn_like(x[:1])).double()  # correlated inputs: H far from a multiple of I
    y = layer(x).detach()
    y = y + 0.2 * torch.randn_like(y)
    return layer, x, y


def _brute(fitter: Fitter, scheme, shape, groups, p0, b0, mom: Moments, damp: float):
    """The damped least squares over the packed parameters (and bias), by forming the
    quadratic in an explicit basis of the packed space and solving it densely."""
    like = scheme.pack(torch.zeros(shape, dtype=torch.float64), groups)
    n_p = like.numel()
    n_b = 0 if b0 is None else b0.numel()
    eye = torch.eye(n_p + n_b, dtype=torch.float64)
    basis = [fitter.wb(e[:n_p].reshape(like.shape), None if b0 is None else e[n_p:]) for e in eye]
    h, c = mom.h, mom.c
    scale = h.diagonal(dim1=1, dim2=2).mean()
    lam = damp * scale
    h = h + (1e-12 * scale + lam) * torch.eye(h.shape[-1], dtype=h.dtype)
    c = c + lam * fitter.wb(p0, b0)
    flat = torch.stack([v.reshape(-1) for v in basis])              # [k, g*m*d]
    hv = torch.stack([(v @ h).reshape(-1) for v in basis])
    q = flat @ hv.T
    rhs = flat @ c.reshape(-1)
    z = torch.linalg.solve(q, rhs)
    return z[:n_p].reshape(like.shape), (None if b0 is None else z[n_p:])


CASES = [  # scheme, weight shape, conv groups, bias, solved exactly (no CG steps)
    ("channel", (6, 6), 1, True, True),
    ("channel", (6, 6, 1, 1), 1, False, True),
    ("channel", (5, 5, 3, 3), 1, True, False),
    ("channel", (8, 4, 3, 3), 2, False, False),
    ("block", (12, 4), 1, True, True),
    ("block", (8, 4, 3, 3), 1, False, False),
    ("quarter", (6, 6, 3, 3), 1, True, False),
    ("flip", (6, 6), 1, False, False),
    ("eighth", (6, 6, 1, 1), 1, True, False),
    ("spatial", (4, 3, 3, 3), 1, True, False),
    ("repeat:2", (6, 4), 1, True, False),
]


@pytest.mark.parametrize("damp", [0.0, 0.01])
@pytest.mark.parametrize("name,shape,groups,bias,exact", CASES, ids=[f"{c[0]}-{'x'.join(map(str, c[1]))}-g{c[2]}" for c in CASES])
def test_solver_matches_brute_force_least_squares(name, shape, groups, bias, exact, damp):
    scheme = get_scheme(name)
    layer, x, y = _layer(shape, groups, bias)
    xs, ys = layer_io(layer, x, y)
    mom = Moments(bias)
    mom.add(xs, ys)
    sgroups = groups if len(shape) > 2 else 1
    fitter = Fitter(scheme, shape, sgroups, groups if len(shape) > 2 else 1, bias)
    p0 = scheme.pack(layer.weight.detach(), sgroups)
    b0 = layer.bias.detach() if bias else None
    p, b = fitter.solve(p0, b0, mom, SolveOptions(max_iter=400, rel_tol=1e-14, damp=damp))
    pb, bb = _brute(fitter, scheme, shape, sgroups, p0, b0, mom, damp)
    assert torch.allclose(fitter.wb(p, b), fitter.wb(pb, bb), atol=1e-6, rtol=1e-6)
    assert relative_error(fitter.wb(p, b), mom) == pytest.approx(relative_error(fitter.wb(pb, bb), mom), rel=1e-7)
    # the fit is a real improvement over the nearest symmetric weight it starts from
    assert relative_error(fitter.wb(p, b), mom) < relative_error(fitter.wb(p0, b0), mom)
    assert (tap_layout(scheme, shape, groups if len(shape) > 2 else 1) is not None) == (name in ("channel", "block"))
    if exact:
        assert fitter.iterations == 0


def test_block_gate_groups_solved_like_stacked_blocks():
    """LSTM gate blocks arrive as groups of the block scheme; the direct solve sees the
    same stacked symmetric blocks."""
    scheme = get_scheme("block")
    layer, x, y = _layer((12, 4), 1, True)
    mom = Moments(True)
    mom.add(*layer_io(layer, x, y))
    fitter = Fitter(scheme, (12, 4), 3, 1, True)
    p0 = scheme.pack(layer.weight.detach(), 3)
    p, b = fitter.solve(p0, layer.bias.detach(), mom, SolveOptions())
    pb, bb = _brute(fitter, scheme, (12, 4), 3, p0, layer.bias.detach(), mom, 0.01)
    assert fitter.iterations == 0
    assert torch.allclose(fitter.wb(p, b), fitter.wb(pb, bb), atol=1e-8)


def test_relative_stop_ends_within_its_tolerance_of_the_optimum():
    """rel_tol stops the k × k CG early, with the squared error within rel_tol of the
    optimum; a tight tolerance takes more steps."""
    scheme = get_scheme("channel")
    torch.manual_seed(1)
    layer = nn.Conv2d(16, 16, 3, padding=1).double()
    x = torch.randn(16, 16, 8, 8, dtype=torch.float64)
    x = torch.nn.functional.avg_pool2d(x, 3, 1, 1)  # spatially correlated, as features are
    y = layer(x).detach() + 0.3 * torch.randn(16, 16, 8, 8, dtype=torch.float64)
    mom = Moments(True)
    mom.add(*layer_io(layer, x, y))
    fitter = Fitter(scheme, (16, 16, 3, 3), 1, 1, True)
    p0 = scheme.pack(layer.weight.detach(), 1)
    loose = fitter.solve(p0, layer.bias.detach(), mom, SolveOptions(max_iter=500, rel_tol=1e-2))
    steps_loose = fitter.iterations
    tight = fitter.solve(p0, layer.bias.detach(), mom, SolveOptions(max_iter=500, rel_tol=1e-12))
    assert fitter.iterations > steps_loose >= 1
    e_loose = relative_error(fitter.wb(*loose), mom) ** 2
    e_best = relative_error(fitter.wb(*tight), mom) ** 2
    assert e_best <= e_loose <= e_best * 1.02


def test_float32_moments_give_the_float64_fit():
    """Moments whose products are taken in float32 (summed in float64) fit the same layer
    to the same output error as float64 moments, to 1e-5."""
    torch.manual_seed(2)
    layer = nn.Conv2d(32, 32, 3, padding=1)
    x = torch.nn.functional.avg_pool2d(torch.randn(32, 32, 12, 12), 3, 1, 1)
    y = layer(x).detach() + 0.01 * torch.randn(32, 32, 12, 12)
    scheme = get_scheme("channel")
    errors = []
    for dtype in (torch.float32, torch.float64):
        mom = Moments(True, dtype=dtype)
        mom.add(*layer_io(layer, x, y))
        fitter = Fitter(scheme, (32, 32, 3, 3), 1, 1, True)
        p, b = fitter.solve(scheme.pack(layer.weight.detach(), 1), layer.bias.detach(), mom,
                            SolveOptions(max_iter=200, rel_tol=1e-10))
        errors.append(relative_error(fitter.wb(p, b), mom))
        naive = relative_error(fitter.wb(scheme.pack(layer.weight.detach().double(), 1),
                                         layer.bias.detach().double()), mom)
        assert errors[-1] < naive - 0.01
    assert errors[0] == pytest.approx(errors[1], abs=1e-5)


def test_moments_sample_rows_per_dimension_but_never_below_the_floor():
    """``rows_per_dim`` keeps a seeded sample of about rows_per_dim × d rows, at least
    ``MIN_SAMPLE_ROWS`` (a small layer's moments are exact); the sample's second moment
    estimates the full one."""
    from symconvert.surgery.calib_moments import MIN_SAMPLE_ROWS

    torch.manual_seed(0)
    small = torch.randn(1, 3000, 8, dtype=torch.float64)
    full, sampled = Moments(False), Moments(False, rows_per_dim=32)
    full.add(small, None)
    sampled.add(small, None)
    assert sampled.rows == 3000 and torch.equal(sampled.h, full.h)
    d = 300
    big = torch.randn(1, 60000, d, dtype=torch.float64) * torch.linspace(0.5, 2, d)
    full, sampled = Moments(False), Moments(False, rows_per_dim=32, calls=2)
    for half in big.chunk(2, dim=1):
        full.add(half, None)
        sampled.add(half, None)
    assert sampled.rows == pytest.approx(max(32 * d, MIN_SAMPLE_ROWS), rel=0.01)
    est, ref = sampled.h / sampled.rows, full.h / full.rows
    assert float((est - ref).norm() / ref.norm()) < 0.2
    assert torch.allclose(est[0].diagonal(), ref[0].diagonal(), rtol=0.1)


@pytest.mark.parametrize("layer", [
    nn.Conv2d(6, 6, 3, padding=1, bias=False),
    nn.Conv2d(6, 4, 3, stride=2, dilation=2, padding=2, groups=2),
    nn.Conv1d(4, 4, 5, padding=2, bias=False),
    nn.Linear(8, 8),
])
def test_sampling_a_call_before_im2col_gives_the_same_moments_as_sampling_after(layer,
                                                                                monkeypatch):
    """``Moments.add_call`` gathers only the sampled rows of a conv's columns; the moments
    equal those of the whole im2col sampled with the same seed."""
    from symconvert.surgery import calib_moments

    monkeypatch.setattr(calib_moments, "MIN_SAMPLE_ROWS", 64)
    torch.manual_seed(0)
    shape = {nn.Conv2d: (16, layer.in_channels if hasattr(layer, "in_channels") else 0, 20, 20),
             nn.Conv1d: (16, 4, 300), nn.Linear: (16, 300, 8)}[type(layer)]
    x = torch.randn(shape)
    with torch.no_grad():
        y = layer(x)
    # rows_per_dim small enough that the sample is a fraction of the rows
    a = Moments(layer.bias is not None, rows_per_dim=1, seed=3)
    b = Moments(layer.bias is not None, rows_per_dim=1, seed=3)
    a.add_call(layer, x, y)
    b.add(*layer_io(layer, x, y))
    total = layer_io(layer, x, y)[0].shape[1]
    assert a.rows == b.rows < total
    assert torch.allclose(a.h, b.h, rtol=1e-12, atol=0)
    assert torch.allclose(a.c, b.c, rtol=1e-12, atol=0) and a.yy == pytest.approx(b.yy, rel=1e-12)


@pytest.mark.parametrize("d", [5, 1024, 1500])
def test_banded_gram_equals_the_full_product(d):
    from symconvert.surgery.calib_moments import gram

    torch.manual_seed(0)
    x = torch.randn(2, 300, d, dtype=torch.float64)
    h = gram(x)
    assert torch.allclose(h, x.transpose(1, 2) @ x, rtol=1e-12, atol=1e-9)
