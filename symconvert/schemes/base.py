"""The scheme contract and the orbit machinery every permutation scheme shares.

A scheme maps free parameters P to a full weight W = unpack(P) that is symmetric by
construction. For schemes defined by a group G of index permutations, the admissible
weights are those constant on every G-orbit, so

    unpack(P)[x] = P[orbit(x)]          (a gather)
    pack(W)[o]   = mean_{x in o} W[x]   (the Frobenius-nearest admissible weight)

and the free-parameter count is the number of orbits, which Burnside's lemma gives in
closed form: |orbits| = (1/|G|) * sum_{g in G} |fix(g)|.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from symconvert.schemes.fast import ChannelMaps, TapFactors

Shape = tuple[int, ...]


class Scheme:
    """One symmetry scheme: eligibility, free-parameter count, pack and unpack.

    Subclasses set the class attributes and implement the four methods. ``groups`` is
    the number of independent square blocks along the output dimension (conv groups,
    or RNN gates); a scheme may ignore it.
    """

    name: str = ""
    paper_name: str = ""
    definition: str = ""
    layers: str = ""
    fraction: str = ""
    #: kinds of weight the scheme can act on
    kinds: tuple[str, ...] = ("conv", "linear", "rnn")
    #: unpack is linear in the packed parameters (W = A·P): a least-squares fit in the
    #: packed space is exact (calibration), the gradient is a fixed map
    is_linear: bool = True
    #: unpack is a selection: every dense entry equals one packed entry, so an export can
    #: rebuild W by index gathers (``symconvert.io.export_packed``)
    is_gather: bool = True
    #: the fast form runs only on square blocks at least this wide: below it, its smaller
    #: products were measured no faster than the dense one (CPU kernels lose efficiency
    #: at few channels); see ``fast_reason``
    fast_min_width: int = 0

    def __init__(self, arg: str | None = None) -> None:
        if arg is not None:
            raise ValueError(f"scheme {self.name!r} takes no argument (got {arg!r})")

    @property
    def spec(self) -> str:
        """The string that rebuilds this scheme through ``get_scheme``."""
        return self.name

    def check(self, shape: Shape, groups: int = 1) -> str | None:
        """Why a weight of this shape cannot be converted, or None if it can."""
        raise NotImplementedError

    def free_count(self, shape: Shape, groups: int = 1) -> int:
        """Number of free parameters for a weight of this shape (closed form)."""
        raise NotImplementedError

    def pack(self, weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """Free parameters of the Frobenius-nearest admissible weight."""
        raise NotImplementedError

    def unpack(self, packed: torch.Tensor, shape: Shape, groups: int = 1) -> torch.Tensor:
        """The full, admissible weight of ``shape`` built from the free parameters."""
        raise NotImplementedError

    def project(self, weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """unpack(pack(W)): the nearest admissible weight."""
        return self.unpack(self.pack(weight, groups), tuple(weight.shape), groups)

    def fast_reason(self, shape: Shape, groups: int = 1) -> str | None:
        """Why a weight of this (eligible) shape has no fast form; None when it has one."""
        return f"`{self.name}` saves no multiply-adds (its symmetric blocks run dense)"

    def fast_ratio(self, shape: Shape, groups: int = 1) -> float:
        """Multiply-adds of the fast form over the dense layer's, per output position
        (stride 1); 1.0 without a fast form."""
        return 1.0

    def fast(self, packed: torch.Tensor, shape: Shape, groups: int = 1
             ) -> ChannelMaps | TapFactors:
        """The fast form (``symconvert.schemes.fast``) of the weight ``unpack(packed)``:
        differentiable in ``packed``, so exact in training too."""
        raise NotImplementedError(self.fast_reason(shape, groups))

    def describe(self, shape: Shape, groups: int = 1) -> str | None:
        """A short note on how the scheme splits this weight (shown in the plan)."""
        return None

    def __repr__(self) -> str:
        return f"<scheme {self.spec}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Scheme) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash(self.spec)


# --- groups acting on an n x n square --------------------------------------------------

IndexMap = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class SquareSymmetry:
    """A symmetry of the n x n square: its index map and its fixed-point count."""

    name: str
    apply: IndexMap
    fixed: Callable[[int], int]


IDENTITY = SquareSymmetry("identity", lambda i, j, n: (i, j), lambda n: n * n)
TRANSPOSE = SquareSymmetry("transpose", lambda i, j, n: (j, i), lambda n: n)
ANTI_TRANSPOSE = SquareSymmetry(
    "anti-transpose", lambda i, j, n: (n - 1 - j, n - 1 - i), lambda n: n
)
ROT180 = SquareSymmetry("rot180", lambda i, j, n: (n - 1 - i, n - 1 - j), lambda n: n % 2)
ROT90 = SquareSymmetry("rot90", lambda i, j, n: (j, n - 1 - i), lambda n: n % 2)
ROT270 = SquareSymmetry("rot270", lambda i, j, n: (n - 1 - j, i), lambda n: n % 2)
FLIP_LR = SquareSymmetry("flip-lr", lambda i, j, n: (i, n - 1 - j), lambda n: n * (n % 2))
FLIP_UD = SquareSymmetry("flip-ud", lambda i, j, n: (n - 1 - i, j), lambda n: n * (n % 2))


@dataclass(frozen=True)
class SquareGroup:
    """A finite group of symmetries of the n x n square (listed in full, closed)."""

    name: str
    elements: tuple[SquareSymmetry, ...]

    def orbit_count(self, n: int) -> int:
        """Burnside: the number of orbits on n x n indices."""
        total = sum(g.fixed(n) for g in self.elements)
        assert total % len(self.elements) == 0, (self.name, n)
        return total // len(self.elements)

    def orbit_index(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Long tensor of n*n entries: the orbit number of each row-major (i, j)."""
        return _orbit_index(self, n, str(device))

    def orbit_images(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(|G|, orbits) long tensor: the images of each orbit's first member under every
        element of the group. Every orbit member appears equally often in a column, so
        the orbit mean is the mean of a gather (cheaper than a scatter)."""
        return _orbit_images(self, n, str(device))


@functools.lru_cache(maxsize=256)
def _orbit_index(group: SquareGroup, n: int, device: str) -> torch.Tensor:
    if device != "cpu":
        return _orbit_index(group, n, "cpu").to(device)
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    rep = None  # each entry's smallest row-major image: its orbit's first member
    for g in group.elements:
        a, b = g.apply(i, j, n)
        rep = a * n + b if rep is None else torch.minimum(rep, a * n + b)
    rep = rep.flatten()
    # Orbits numbered by their smallest member in row-major order: for `channel` this is
    # the row-major upper triangle, the paper's `tri` storage. Ranking the members by a
    # cumulative count is linear; torch.unique sorted n² values (11 s at n = 4096).
    is_first = torch.zeros(n * n, dtype=torch.bool)
    is_first[rep] = True
    return (torch.cumsum(is_first, 0) - 1)[rep]


@functools.lru_cache(maxsize=256)
def _orbit_images(group: SquareGroup, n: int, device: str) -> torch.Tensor:
    if device != "cpu":
        return _orbit_images(group, n, "cpu").to(device)
    index = _orbit_index(group, n, "cpu")
    # first (smallest row-major) member of every orbit: orbits are numbered in order of
    # first appearance, so a first member is where the index exceeds all before it
    is_first = torch.ones_like(index, dtype=torch.bool)
    is_first[1:] = index[1:] > torch.cummax(index, 0).values[:-1]
    first = is_first.nonzero().flatten()
    i, j = first // n, first % n
    return torch.stack([a * n + b for a, b in (g.apply(i, j, n) for g in group.elements)])


@functools.lru_cache(maxsize=256)
def _orbit_scale(group: SquareGroup, n: int, device: str) -> torch.Tensor:
    """|orbit| / |G| for every orbit: turns the sum of the group's gathers into the sum
    over the orbit (a member fixed by k group elements is gathered k times)."""
    if device != "cpu":
        return _orbit_scale(group, n, "cpu").to(device)
    sizes = torch.bincount(_orbit_index(group, n, "cpu")).to(torch.float32)
    return sizes / len(group.elements)


class _OrbitGather(torch.autograd.Function):
    """W = P.index_select(dim, index), whose gradient is gathered rather than scattered:
    dP[o] = sum_{x in orbit o} dW[x] = (|o| / |G|) * sum_g dW[g(first member of o)].
    A scatter-add (index_select's own backward) made a resnet50 training step ~15 % slower."""

    @staticmethod
    def forward(ctx, packed, dim, index, images, scale):  # noqa: D102
        ctx.dim = dim
        ctx.save_for_backward(images, scale)
        return packed.index_select(dim, index)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # noqa: D102
        images, scale = ctx.saved_tensors
        total = grad.index_select(ctx.dim, images[0])
        for row in images[1:]:
            total.add_(grad.index_select(ctx.dim, row))
        # dP = (|o| / |G|) * sum_g dW[g(o)]
        view = [1] * grad.dim()
        view[ctx.dim] = -1
        return total.mul_(scale.to(grad.dtype).view(view)), None, None, None, None


@functools.lru_cache(maxsize=256)
def _block_tables(group: SquareGroup, n: int, blocks: int, device: str):
    """index, images and sizes for ``blocks`` stacked squares, as offsets into the flat
    (blocks * orbits) packed rows and (blocks * n * n) weight rows."""
    if device != "cpu":
        return tuple(t.to(device) for t in _block_tables(group, n, blocks, "cpu"))
    index, images = _orbit_index(group, n, "cpu"), _orbit_images(group, n, "cpu")
    count = images.shape[1]
    offsets = torch.arange(blocks)[:, None]
    index_b = (offsets * count + index[None, :]).reshape(-1)
    images_b = (offsets[None] * (n * n) + images[:, None, :]).reshape(len(images), -1)
    return index_b, images_b, _orbit_scale(group, n, "cpu").repeat(blocks)


def orbit_gather(packed: torch.Tensor, dim: int, group: SquareGroup, n: int,
                 blocks: int = 1) -> torch.Tensor:
    """unpack along ``dim``: every entry takes its orbit's free parameter. With
    ``blocks`` > 1, ``dim`` holds ``blocks`` stacked packed squares (orbit count each)."""
    dev = packed.device
    if blocks == 1:
        index = group.orbit_index(n, dev)
        images, scale = None, None
    else:
        index, images, scale = _block_tables(group, n, blocks, str(dev))
    if not packed.requires_grad or not torch.is_grad_enabled():
        return packed.index_select(dim, index)
    if images is None:
        images, scale = group.orbit_images(n, dev), _orbit_scale(group, n, str(dev))
    return _OrbitGather.apply(packed, dim, index, images, scale)


def orbit_mean(x: torch.Tensor, dim: int, images: torch.Tensor) -> torch.Tensor:
    """Average the entries of ``x`` along ``dim`` over each orbit, given the orbit images
    of ``SquareGroup.orbit_images``: the mean over the group of a gather."""
    total = x.index_select(dim, images[0])
    for row in images[1:]:
        total.add_(x.index_select(dim, row))
    return total.div_(images.shape[0])


def matrix_blocks(shape: Shape, groups: int) -> tuple[int, int]:
    """(g, n) when the weight is g square n x n blocks along its output dimension."""
    return groups, shape[0] // groups


def check_square_blocks(shape: Shape, groups: int) -> str | None:
    """The eligibility rule shared by every scheme acting on the (out, in) square."""
    if len(shape) < 2:
        return "weight has fewer than two dimensions"
    out, inp = shape[0], shape[1]
    if out % groups:
        return f"out channels {out} not divisible by {groups} groups"
    n = out // groups
    if n != inp:
        if groups > 1:
            return f"per-group channel block {n}x{inp} is not square"
        return f"out {out} != in {inp}: the channel matrix is not square"
    if n < 2:
        return "1x1 channel blocks (depthwise): nothing to share"
    return None


def prod(values: Sequence[int]) -> int:
    return math.prod(values) if values else 1
