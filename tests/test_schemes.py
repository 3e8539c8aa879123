"""SPEC section 3: the schemes as pure maps, checked against their laws (hypothesis).

For every permutation scheme the admissible weights are those invariant under a group G
of index permutations. The laws:

- admissible:  unpack(P) is invariant under G (checked with the group's generators,
  written here independently of the scheme's own orbit tables);
- identity:    pack(unpack(P)) == P on the free parameters;
- nearest:     W - unpack(pack(W)) is orthogonal to every admissible direction, so no
  admissible A is closer to W (checked directly on random A as well);
- count:       free_count(shape) == pack(W).numel() == the number of G-orbits, counted
  by brute force on the index tensor.

`eigen` has its own tests (tests/test_eigen.py): it is not a permutation scheme.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from symconvert.errors import UnknownSchemeError
from symconvert.schemes import get_scheme, list_schemes, scheme_names

Generator = Callable[[torch.Tensor], torch.Tensor]

# --- the groups, written independently of symconvert/schemes/base.py -----------------
# A weight of shape (g*n, n, *taps) is viewed as g squares (g, n, n, *taps); each
# generator maps that view to its image, which must equal the weight when admissible.


def _squares(w: torch.Tensor, groups: int) -> torch.Tensor:
    return w.reshape(groups, w.shape[0] // groups, *w.shape[1:])


def _on_square(op: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    def gen(w: torch.Tensor, groups: int) -> torch.Tensor:
        return op(_squares(w, groups)).reshape(w.shape)

    return gen


transpose = _on_square(lambda s: s.transpose(1, 2))                       # W[i, j] -> W[j, i]
anti_transpose = _on_square(lambda s: s.flip(1).flip(2).transpose(1, 2))  # W[n-1-j, n-1-i]
flip_lr = _on_square(lambda s: s.flip(2))
flip_ud = _on_square(lambda s: s.flip(1))


def kernel_transpose(w: torch.Tensor, groups: int) -> torch.Tensor:
    return w.transpose(2, 3)


def block_transposes(w: torch.Tensor, groups: int) -> torch.Tensor:
    """Transpose each n x n block of an (r*n, n) or (n, r*n) weight, tap by tap."""
    out, inp = w.shape[0], w.shape[1]
    if out >= inp:
        r, n = out // inp, inp
        return w.reshape(r, n, n, *w.shape[2:]).transpose(1, 2).reshape(w.shape)
    r, n = inp // out, out
    return w.reshape(n, r, n, *w.shape[2:]).transpose(0, 2).reshape(w.shape)


def repeat_shift(r: int) -> Generator:
    """Cyclic shift of the R output slices (generates the whole cyclic group)."""

    def gen(w: torch.Tensor, groups: int) -> torch.Tensor:
        return w.reshape(r, w.shape[0] // r, *w.shape[1:]).roll(1, 0).reshape(w.shape)

    return gen


GENERATORS: dict[str, list] = {
    "channel": [transpose],
    "spatial": [kernel_transpose],
    "channel+spatial": [transpose, kernel_transpose],
    "block": [block_transposes],
    "quarter": [transpose, anti_transpose],
    "eighth": [transpose, flip_lr],  # a reflection and a quarter-turn's worth: all of D4
    "flip": [flip_lr, flip_ud],
    "repeat:2": [repeat_shift(2)],
    "repeat:3": [repeat_shift(3)],
}
SCHEMES = list(GENERATORS)


# --- eligible shapes per scheme -----------------------------------------------------

taps_st = st.sampled_from([(), (1,), (3,), (1, 1), (2, 2), (3, 3), (2, 2, 2)])


@st.composite
def square_shapes(draw):
    """(g*n, n, *taps): grouped convs are g square blocks along the output dimension."""
    g = draw(st.integers(1, 3))
    n = draw(st.integers(2, 7))
    return (g * n, n, *draw(taps_st)), g


@st.composite
def kernel_shapes(draw):
    """(o, i, k, k) for any channels; depthwise (i == 1, groups == o) included."""
    k = draw(st.integers(2, 5))
    o = draw(st.integers(1, 6))
    if draw(st.booleans()):
        return (o, 1, k, k), o
    return (o, draw(st.integers(1, 6)), k, k), 1


@st.composite
def square_kernel_shapes(draw):
    g = draw(st.integers(1, 3))
    n = draw(st.integers(2, 6))
    k = draw(st.integers(2, 4))
    return (g * n, n, k, k), g


@st.composite
def block_shapes(draw):
    """m x n with m = r*n (or n = r*m), as for qkv (3n x n) and MLP linears (4n x n)."""
    n = draw(st.integers(2, 6))
    r = draw(st.integers(1, 4))
    taps = draw(st.sampled_from([(), (1, 1), (3, 3)]))
    if draw(st.booleans()):
        return (r * n, n, *taps), 1
    return (n, r * n, *taps), 1


def repeat_shapes(r: int):
    @st.composite
    def shapes(draw):
        m = draw(st.integers(1, 5))
        rest = draw(st.sampled_from([(3,), (4, 2), (2, 3, 3)]))
        return (r * m, *rest), 1

    return shapes()


SHAPES = {
    "channel": square_shapes(),
    "spatial": kernel_shapes(),
    "channel+spatial": square_kernel_shapes(),
    "block": block_shapes(),
    "quarter": square_shapes(),
    "eighth": square_shapes(),
    "flip": square_shapes(),
    "repeat:2": repeat_shapes(2),
    "repeat:3": repeat_shapes(3),
}

LAWS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _random(shape, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def _is_admissible(spec: str, w: torch.Tensor, groups: int) -> bool:
    return all(torch.equal(g(w, groups), w) for g in GENERATORS[spec])


def _orbit_count(spec: str, shape, groups: int) -> int:
    """Brute force: label every index, take the minimum label over the group until
    nothing changes; the number of distinct labels left is the number of orbits."""
    labels = torch.arange(torch.Size(shape).numel(), dtype=torch.float64).reshape(shape)
    while True:
        new = labels
        for g in GENERATORS[spec]:
            new = torch.minimum(new, g(new, groups))
        if torch.equal(new, labels):
            return int(labels.unique().numel())
        labels = new


def test_every_selection_scheme_has_its_laws_here():
    """The group laws below cover every registered scheme whose unpack is a selection
    (``Scheme.is_gather``): a new permutation scheme adds its generators to GENERATORS."""
    gather = {s.spec for s in list_schemes() if s.is_gather}
    assert gather <= set(GENERATORS), sorted(gather - set(GENERATORS))
    assert all(s.is_linear for s in list_schemes() if s.is_gather)


def test_every_named_scheme_is_registered():
    # the registry is the single list the CLI, the planner and these laws share
    for name in ("channel", "spatial", "channel+spatial", "block", "quarter", "eighth",
                 "flip", "repeat"):
        assert name in scheme_names()
    assert {s.spec.partition(":")[0] for s in list_schemes()} >= {"channel", "repeat"}


@pytest.mark.parametrize("spec", SCHEMES)
@LAWS
@given(data=st.data())
def test_unpack_is_admissible(spec, data):
    scheme = get_scheme(spec)
    shape, groups = data.draw(SHAPES[spec])
    assert scheme.check(shape, groups) is None, (shape, groups)
    packed = _random((scheme.free_count(shape, groups),), data.draw(st.integers(0, 2**16)))
    packed = packed.reshape(scheme.pack(torch.zeros(shape, dtype=torch.float64), groups).shape)
    w = scheme.unpack(packed, shape, groups)
    assert tuple(w.shape) == shape
    assert _is_admissible(spec, w, groups)


@pytest.mark.parametrize("spec", SCHEMES)
@LAWS
@given(data=st.data())
def test_pack_of_unpack_is_identity_on_free_parameters(spec, data):
    scheme = get_scheme(spec)
    shape, groups = data.draw(SHAPES[spec])
    template = scheme.pack(torch.zeros(shape, dtype=torch.float64), groups)
    packed = _random(template.shape, data.draw(st.integers(0, 2**16)))
    again = scheme.pack(scheme.unpack(packed, shape, groups), groups)
    assert again.shape == packed.shape
    torch.testing.assert_close(again, packed, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("spec", SCHEMES)
@LAWS
@given(data=st.data())
def test_pack_is_the_nearest_admissible_weight(spec, data):
    scheme = get_scheme(spec)
    shape, groups = data.draw(SHAPES[spec])
    seed = data.draw(st.integers(0, 2**16))
    w = _random(shape, seed)
    nearest = scheme.project(w, groups)
    assert _is_admissible(spec, nearest, groups)
    residual = w - nearest
    template = scheme.pack(w, groups)
    for k in range(3):
        # a random admissible weight (and so a random admissible direction)
        a = scheme.unpack(_random(template.shape, seed + 1 + k), shape, groups)
        assert torch.dot(residual.flatten(), a.flatten()).abs() <= 1e-9 * (
            residual.norm() * a.norm() + 1
        )
        assert (w - a).norm() >= residual.norm() - 1e-12
        # nearby admissible perturbations of the projection are no closer either
        assert (w - (nearest + 1e-3 * a)).norm() >= residual.norm() - 1e-12


@pytest.mark.parametrize("spec", SCHEMES)
@LAWS
@given(data=st.data())
def test_free_count_is_the_orbit_count(spec, data):
    scheme = get_scheme(spec)
    shape, groups = data.draw(SHAPES[spec])
    count = scheme.free_count(shape, groups)
    assert count == scheme.pack(_random(shape, 0), groups).numel()
    assert count == _orbit_count(spec, shape, groups)
    assert count < torch.Size(shape).numel()


@pytest.mark.parametrize("spec", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pack_and_unpack_keep_dtype(spec, dtype):
    # parametrize's right_inverse may not change the dtype (bf16/fp16 models convert too)
    scheme = get_scheme(spec)
    shape = {"spatial": (4, 2, 3, 3), "block": (12, 4, 3, 3)}.get(spec, (6, 6, 3, 3))
    w = torch.randn(shape).to(dtype)
    packed = scheme.pack(w)
    assert packed.dtype == dtype
    assert scheme.unpack(packed, shape).dtype == dtype


# --- closed forms of the spec table --------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 64, 256, 512])
def test_channel_free_fraction_is_n_plus_1_over_2n(n):
    shape = (n, n, 3, 3)
    assert get_scheme("channel").free_count(shape) * 2 * n == (n + 1) * n * n * 9


@pytest.mark.parametrize("k", [2, 3, 5, 7])
def test_spatial_free_fraction_is_k_k_plus_1_over_2k2(k):
    assert get_scheme("spatial").free_count((5, 3, k, k)) == 5 * 3 * k * (k + 1) // 2


@pytest.mark.parametrize(
    ("spec", "low", "high"),
    [("channel+spatial", 0.30, 0.34), ("quarter", 0.24, 0.26), ("eighth", 0.12, 0.13),
     ("flip", 0.24, 0.26), ("block", 0.49, 0.51), ("repeat:4", 0.25, 0.25)],
)
def test_free_fraction_matches_the_spec_table(spec, low, high):
    scheme = get_scheme(spec)
    shape = (256, 256, 3, 3)
    assert low <= scheme.free_count(shape) / (256 * 256 * 9) <= high


def test_channel_counts_the_resnet_square_convs():
    # a 3x3 conv with n channels keeps the upper triangle of every tap: n(n+1)/2 * 9
    channel = get_scheme("channel")
    assert channel.free_count((64, 64, 3, 3)) == 64 * 65 // 2 * 9 == 18720
    assert channel.free_count((512, 512, 3, 3)) == 512 * 513 // 2 * 9


def test_channel_on_grouped_conv_is_per_group():
    # ResNeXt-style grouped conv: 32 groups of 4x4 channel blocks
    channel = get_scheme("channel")
    assert channel.free_count((128, 4, 3, 3), groups=32) == 32 * (4 * 5 // 2) * 9
    w = torch.randn(128, 4, 3, 3, dtype=torch.float64)
    assert _is_admissible("channel", channel.project(w, 32), 32)


def test_block_splits_qkv_into_three_symmetric_blocks():
    block = get_scheme("block")
    assert block.free_count((1152, 384)) == 3 * 384 * 385 // 2
    assert block.free_count((384, 1536)) == 4 * 384 * 385 // 2


# --- eligibility ----------------------------------------------------------------------

# (scheme, shape, groups, eligible): the rule of each scheme on the layers that matter
ELIGIBILITY = [
    ("channel", (64, 64, 3, 3), 1, True),
    ("channel", (64, 64, 1, 1), 1, True),
    ("channel", (128, 64, 3, 3), 1, False),
    ("channel", (64, 1, 3, 3), 64, False),    # depthwise: 1x1 channel blocks
    ("channel", (128, 4, 3, 3), 32, True),    # grouped, square per group
    ("channel", (128, 8, 3, 3), 32, False),   # grouped, 4x8 per group
    ("channel", (384, 384), 1, True),
    ("channel", (1152, 384), 1, False),
    ("spatial", (64, 1, 3, 3), 64, True),     # depthwise included
    ("spatial", (64, 32, 3, 3), 1, True),
    ("spatial", (64, 64, 1, 1), 1, False),
    ("spatial", (64, 64, 1, 7), 1, False),    # not square
    ("spatial", (64, 64, 3), 1, False),       # Conv1d
    ("spatial", (64, 64), 1, False),          # Linear
    ("channel+spatial", (64, 64, 3, 3), 1, True),
    ("channel+spatial", (64, 64, 1, 1), 1, False),
    ("channel+spatial", (64, 1, 3, 3), 64, False),
    ("block", (1152, 384), 1, True),
    ("block", (384, 1536), 1, True),
    ("block", (1000, 384), 1, False),
    ("block", (64, 1, 3, 3), 64, False),
    ("quarter", (64, 64, 3, 3), 1, True),
    ("eighth", (96, 48, 1, 1), 1, False),
    ("flip", (48, 48), 1, True),
    ("repeat:2", (64, 32, 3, 3), 1, True),
    ("repeat:2", (63, 32, 3, 3), 1, False),
    ("repeat:4", (1000, 64), 1, True),
]


@pytest.mark.parametrize(("spec", "shape", "groups", "eligible"), ELIGIBILITY)
def test_eligibility_rule(spec, shape, groups, eligible):
    reason = get_scheme(spec).check(shape, groups)
    if eligible:
        assert reason is None
    else:
        assert isinstance(reason, str) and reason  # a reason the plan can show


# --- the registry ---------------------------------------------------------------------


def test_unknown_scheme_names_close_matches():
    with pytest.raises(UnknownSchemeError, match="channel"):
        get_scheme("chanel")


@pytest.mark.parametrize("spec", ["repeat", "repeat:x", "repeat:1", "channel:3"])
def test_bad_scheme_argument_is_a_clear_error(spec):
    with pytest.raises(UnknownSchemeError, match="scheme"):
        get_scheme(spec)


def test_repeat_spec_round_trips():
    assert get_scheme("repeat:3").spec == "repeat:3"
    assert get_scheme(" channel+spatial ") == get_scheme("channel+spatial")
