"""SPEC section 3, the `eigen:K` scheme: W = V diag(e) Vᵀ per tap and per group block.

It is not a permutation scheme, so its laws are its own:

- admissible:  unpack(P) is symmetric with rank <= K in every block and tap;
- fixed point: unpack(pack(unpack(P))) == unpack(P) (V is not unique, so pack(unpack(P))
  itself may differ from P: signs, rotations, non-orthogonal V);
- nearest:     pack gives the Frobenius-nearest symmetric rank-K matrix — its error equals
  the Eckart–Young optimum ||skew(W)||² + sum of the dropped squared |eigenvalues| of
  sym(W), and no random symmetric rank-K matrix does better;
- count:       free_count == pack(W).numel() == g * taps * (K*n + K);
- training:    gradients reach both V and e (the paper's released `evd` detached them).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from symconvert.errors import UnknownSchemeError
from symconvert.schemes import get_scheme, list_schemes

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def eigen_cases(draw):
    """(scheme, shape, groups): square blocks n >= 2, K < n, taps of 0-2 dims."""
    n = draw(st.integers(2, 9))
    groups = draw(st.integers(1, 3))
    k = draw(st.integers(1, n - 1))
    taps = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    return get_scheme(f"eigen:{k}"), (groups * n, n, *taps), groups


def blocks(w: torch.Tensor, groups: int) -> torch.Tensor:
    """(g*n, n, *taps) -> (g, taps, n, n), written independently of the scheme."""
    n = w.shape[1]
    taps = math.prod(w.shape[2:])
    return w.reshape(groups, n, n, taps).permute(0, 3, 1, 2)


def seeded(seed: int, shape, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@SETTINGS
@given(case=eigen_cases(), seed=st.integers(0, 2**16))
def test_eigen_unpack_is_symmetric_with_rank_at_most_k(case, seed):
    scheme, shape, groups = case
    packed = seeded(seed, scheme.pack(torch.zeros(shape, dtype=torch.float64), groups).shape)
    a = blocks(scheme.unpack(packed, shape, groups), groups)
    assert torch.equal(a, a.transpose(-1, -2))  # exactly: the weight is symmetric by construction
    assert int(torch.linalg.matrix_rank(a, hermitian=True, rtol=1e-9).max()) <= scheme.k


@SETTINGS
@given(case=eigen_cases(), seed=st.integers(0, 2**16))
def test_eigen_unpack_pack_unpack_is_unpack(case, seed):
    scheme, shape, groups = case
    packed = seeded(seed, scheme.pack(torch.zeros(shape, dtype=torch.float64), groups).shape)
    w = scheme.unpack(packed, shape, groups)
    assert torch.allclose(scheme.unpack(scheme.pack(w, groups), shape, groups), w,
                          atol=1e-9 * (1 + w.abs().max()))


@SETTINGS
@given(case=eigen_cases(), seed=st.integers(0, 2**16))
def test_eigen_pack_reaches_the_eckart_young_optimum(case, seed):
    scheme, shape, groups = case
    w = seeded(seed, shape)
    err = (w - scheme.project(w, groups)).pow(2).sum()
    a = blocks(w, groups)
    sym, skew = (a + a.transpose(-1, -2)) / 2, (a - a.transpose(-1, -2)) / 2
    # singular values of a symmetric matrix are its |eigenvalues|, sorted descending
    dropped = torch.linalg.svdvals(sym)[..., scheme.k:]
    optimum = skew.pow(2).sum() + dropped.pow(2).sum()
    assert torch.allclose(err, optimum, rtol=1e-9, atol=1e-9)


@SETTINGS
@given(case=eigen_cases(), seed=st.integers(0, 2**16))
def test_eigen_no_random_symmetric_rank_k_weight_is_closer(case, seed):
    scheme, shape, groups = case
    w = seeded(seed, shape)
    best = (w - scheme.project(w, groups)).norm()
    packed = scheme.pack(w, groups)
    for i in range(5):
        # near the optimum and far from it: both must be at least as far from W
        other = packed + seeded(seed + i + 1, packed.shape) * (0.01 if i % 2 else 1.0)
        assert (w - scheme.unpack(other, shape, groups)).norm() >= best - 1e-9


@SETTINGS
@given(case=eigen_cases())
def test_eigen_free_count_is_the_packed_size(case):
    scheme, shape, groups = case
    n = shape[1]
    taps = math.prod(shape[2:])
    packed = scheme.pack(torch.randn(shape), groups)
    assert scheme.free_count(shape, groups) == packed.numel() == groups * taps * (scheme.k * n + scheme.k)
    assert scheme.free_count(shape, groups) < math.prod(shape)  # K < n always saves


@SETTINGS
@given(case=eigen_cases(), seed=st.integers(0, 2**16))
def test_eigen_pack_keeps_the_dtype_and_is_deterministic(case, seed):
    scheme, shape, groups = case
    w = seeded(seed, shape, torch.float32)
    p1, p2 = scheme.pack(w, groups), scheme.pack(w.clone(), groups)
    assert p1.dtype == torch.float32
    assert torch.equal(p1, p2)


def test_eigen_keeps_the_largest_magnitude_eigenvalues_negative_ones_included():
    q, _ = torch.linalg.qr(seeded(0, (5, 5)))
    evals = torch.tensor([-9.0, 4.0, 0.5, -0.1, 7.0], dtype=torch.float64)
    w = q @ torch.diag(evals) @ q.T
    packed = get_scheme("eigen:2").pack(w)
    kept = packed[0, 0, -1]  # row n holds e
    assert torch.allclose(kept, torch.tensor([-9.0, 7.0], dtype=torch.float64))
    expected = q[:, [0, 4]] @ torch.diag(evals[[0, 4]]) @ q[:, [0, 4]].T
    assert torch.allclose(get_scheme("eigen:2").project(w), expected, atol=1e-10)


def test_eigen_gradients_reach_both_v_and_e():
    scheme = get_scheme("eigen:3")
    shape = (8, 8, 3, 3)
    packed = scheme.pack(torch.randn(shape)).requires_grad_()
    target = torch.randn(shape)
    loss = (scheme.unpack(packed, shape) - target).pow(2).sum()
    loss.backward()
    v_grad, e_grad = packed.grad[..., :8, :], packed.grad[..., 8, :]
    assert v_grad.abs().sum() > 0
    assert e_grad.abs().sum() > 0
    # and the gradient is the right one (finite differences on a small case)
    small = scheme.pack(torch.randn(4, 4, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda p: get_scheme("eigen:3").unpack(p, (4, 4)), (small,))


def test_eigen_converted_layer_trains_both_factors():
    """A converted linear layer: an optimiser step moves V and e and lowers the loss."""
    import symconvert

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
    symconvert.convert(model, "eigen:4", include_head=False)
    packed = model[0].parametrizations.weight.original
    before = packed.detach().clone()
    x, y = torch.randn(64, 12), torch.randint(0, 3, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(20):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    moved = (packed.detach() - before).abs()
    assert moved[..., :12, :].sum() > 0 and moved[..., 12, :].sum() > 0
    assert losses[-1] < losses[0]
    w = model[0].weight
    assert torch.equal(w, w.T)
    assert int(torch.linalg.matrix_rank(w.detach().double(), rtol=1e-5)) <= 4


def test_eigen_rejects_k_not_below_n_with_a_reason():
    scheme = get_scheme("eigen:8")
    assert scheme.check((8, 8, 3, 3)) is not None and "K=8" in scheme.check((8, 8, 3, 3))
    assert scheme.check((16, 16, 3, 3)) is None
    assert scheme.check((16, 8, 3, 3)) is not None  # not square: as channel
    assert scheme.check((32, 16), groups=2) is None  # two 16x16 groups
    assert "n=8" in scheme.check((16, 8), groups=2)  # two 8x8 groups: K is not below n
    import symconvert

    plan = symconvert.inspect(
        torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)), "eigen:8")
    assert not plan.converted and "K=8" in plan.layers[0].reason


@pytest.mark.parametrize("bad", ["eigen", "eigen:0", "eigen:x", "eigen:-2"])
def test_eigen_needs_a_positive_integer_rank(bad):
    with pytest.raises(UnknownSchemeError):
        get_scheme(bad)


def test_eigen_spec_round_trips():
    scheme = get_scheme("eigen:16")
    assert scheme.spec == "eigen:16" and get_scheme(scheme.spec) == scheme


NINE = ["channel", "spatial", "channel+spatial", "block", "quarter", "eighth", "flip",
        "repeat:2", "eigen:16"]


def test_list_schemes_has_the_nine_in_spec_order():
    assert [s.spec for s in list_schemes()] == NINE


def test_schemes_cli_lists_the_nine_with_their_fractions(cli):
    import json

    result = cli("schemes", "--format", "json")
    assert result.code == 0, result
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert list(rows) == NINE
    expected = {"channel": "(n+1)/2n", "spatial": "k(k+1)/2k²", "channel+spatial": "≈ 1/3",
                "block": "≈ 1/2", "quarter": "≈ 1/4", "eighth": "≈ 1/8", "flip": "≈ 1/4",
                "repeat:2": "1/R", "eigen:16": "≈ K(n+1)/n²"}
    assert {name: r["free_fraction"] for name, r in rows.items()} == expected
    table = cli("schemes")
    assert table.code == 0
    for name in NINE:
        assert name in table.stdout
    # the example column: eigen:16 on a 64x64x3x3 conv keeps 16*65/64² of it
    assert f"{16 * 65 / 64**2:.3f}" in table.stdout


def test_schemes_fraction_formulas_match_free_counts():
    """The fraction strings are the free counts of a 64x64x3x3 conv, n = 64, k = 3."""
    n, k = 64, 3
    shape = (n, n, k, k)
    total = math.prod(shape)
    exact = {"channel": (n + 1) / (2 * n), "spatial": k * (k + 1) / (2 * k * k),
             "channel+spatial": (n + 1) / (2 * n) * k * (k + 1) / (2 * k * k),
             "repeat:2": 1 / 2, "eigen:16": 16 * (n + 1) / n**2}
    approx = {"block": 1 / 2, "quarter": 1 / 4, "eighth": 1 / 8, "flip": 1 / 4}
    for scheme in list_schemes():
        fraction = scheme.free_count(shape) / total
        if scheme.spec in exact:
            assert fraction == pytest.approx(exact[scheme.spec], rel=1e-12), scheme.spec
        else:
            assert fraction == pytest.approx(approx[scheme.spec], rel=0.05), scheme.spec
