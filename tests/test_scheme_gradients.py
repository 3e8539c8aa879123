"""The unpack backward is a hand-written gather (faster than index_select's scatter): check
it against finite differences for every scheme, grouped shapes and odd sizes included."""

from __future__ import annotations

import pytest
import torch

from symconvert.schemes import list_schemes

SHAPES = [((6, 6, 3, 3), 1), ((5, 5), 1), ((15, 5, 3, 3), 3), ((7, 7, 3, 3), 1), ((8, 4), 1)]
CASES = [(s, shape, g) for s in list_schemes() for shape, g in SHAPES if s.check(shape, g) is None]


@pytest.mark.parametrize(("scheme", "shape", "groups"), CASES,
                         ids=[f"{s.spec}-{'x'.join(map(str, sh))}-g{g}" for s, sh, g in CASES])
def test_unpack_gradient_matches_finite_differences(scheme, shape, groups):
    torch.manual_seed(0)
    packed = scheme.pack(torch.randn(shape, dtype=torch.float64), groups).requires_grad_()
    assert torch.autograd.gradcheck(lambda p: scheme.unpack(p, shape, groups), (packed,))


def test_unpack_gradient_is_the_orbit_sum():
    """dL/dP[orbit] = sum of dL/dW over the orbit (diagonal entries counted once)."""
    from symconvert.schemes import get_scheme

    scheme = get_scheme("channel")
    packed = scheme.pack(torch.randn(3, 3)).requires_grad_()
    upstream = torch.arange(9.0).view(3, 3)
    (scheme.unpack(packed, (3, 3)) * upstream).sum().backward()
    # row-major upper triangle: (0,0) (0,1) (0,2) (1,1) (1,2) (2,2)
    expected = torch.tensor([0.0, 1 + 3, 2 + 6, 4.0, 5 + 7, 8.0]).view_as(packed)
    assert torch.equal(packed.grad, expected)
