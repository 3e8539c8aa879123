"""Schemes that act on the (out, in) channel square of every tap: channel, quarter,
eighth, flip. They differ only in the group acting on the square."""

from __future__ import annotations

import functools

import torch

from symconvert.schemes.base import (
    ANTI_TRANSPOSE,
    FLIP_LR,
    FLIP_UD,
    IDENTITY,
    ROT90,
    ROT180,
    ROT270,
    TRANSPOSE,
    Scheme,
    Shape,
    SquareGroup,
    check_square_blocks,
    matrix_blocks,
    orbit_gather,
    orbit_mean,
    prod,
)
from symconvert.schemes.fast import ChannelMaps, flip_maps, halves, quarter_maps
from symconvert.schemes.registry import register_scheme


@functools.lru_cache(maxsize=256)
def _corner(group: SquareGroup, n: int, rows: int, cols: int) -> torch.Tensor | None:
    """Orbit numbers of W[:rows, :cols] (row-major); None when that is arange (the
    packed tensor already is the corner)."""
    index = group.orbit_index(n).view(n, n)[:rows, :cols].reshape(-1)
    return None if torch.equal(index, torch.arange(index.numel())) else index


def corner(packed: torch.Tensor, group: SquareGroup, n: int, rows: int, cols: int
           ) -> torch.Tensor:
    """W[g, :rows, :cols, taps] gathered straight from the packed (g, orbits, taps)."""
    index = _corner(group, n, rows, cols)
    if index is not None:
        packed = packed.index_select(1, index.to(packed.device))
    return packed.reshape(packed.shape[0], rows, cols, *packed.shape[2:])


class SquareGroupScheme(Scheme):
    """W[g*n + o, i, taps] = P[g, orbit(o, i), taps]: each of the g channel blocks is
    invariant under ``group`` acting on its (o, i) indices, tap by tap."""

    group: SquareGroup

    def check(self, shape: Shape, groups: int = 1) -> str | None:
        return check_square_blocks(shape, groups)

    def free_count(self, shape: Shape, groups: int = 1) -> int:
        g, n = matrix_blocks(shape, groups)
        return g * self.group.orbit_count(n) * prod(shape[2:])

    def pack(self, weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
        g, n = matrix_blocks(tuple(weight.shape), groups)
        taps = tuple(weight.shape[2:])
        blocks = weight.reshape(g, n * n, *taps)
        return orbit_mean(blocks, 1, self.group.orbit_images(n, weight.device))

    def unpack(self, packed: torch.Tensor, shape: Shape, groups: int = 1) -> torch.Tensor:
        g, n = matrix_blocks(shape, groups)
        # one gather along dim 0 of (g * orbits, taps) rows: 2-3x faster than along dim 1
        rows = packed.reshape(g * packed.shape[1], -1)
        return orbit_gather(rows, 0, self.group, n, blocks=g).reshape(shape)


class FlipInvariant(SquareGroupScheme):
    """Groups containing the flips (W = W J = J W): y = [y'; J y'_t] with
    y'[o] = sum_{i<h'} W[o, i] [x_t + J x_b; x_m][i] for o < h' (4x fewer multiply-adds)."""

    def fast_reason(self, shape: Shape, groups: int = 1) -> str | None:
        return None

    def fast_ratio(self, shape: Shape, groups: int = 1) -> float:
        n = shape[0] // groups
        return halves(n)[1] ** 2 / n ** 2

    def fast(self, packed: torch.Tensor, shape: Shape, groups: int = 1) -> ChannelMaps:
        g, n = matrix_blocks(shape, groups)
        hc = halves(n)[1]
        small = corner(packed, self.group, n, hc, hc)
        return flip_maps(small.reshape(g * hc, hc, *small.shape[3:]), g, n)


@register_scheme
class Channel(SquareGroupScheme):
    name = "channel"
    paper_name = "tri / wwt"
    definition = "W[o,i,a,b] = W[i,o,a,b] for every tap (a,b)"
    layers = "out == in (per group for grouped convs); square linears"
    fraction = "(n+1)/2n"
    group = SquareGroup("transpose", (IDENTITY, TRANSPOSE))


@register_scheme
class Quarter(SquareGroupScheme):
    """J W J = W: with s = W[:h', :] [x_t + J x_b; x_m] and a = (A - C J)/2 (x_t - J x_b),
    y_t = s_t + a, y_m = s_m, y_b = J (s_t - a): an h' x h' and an h x h product (2x)."""

    name = "quarter"
    paper_name = "quar"
    definition = "symmetric and persymmetric: W = Wᵀ = J Wᵀ J (J: anti-diagonal flip)"
    layers = "as channel"
    fraction = "≈ 1/4"
    group = SquareGroup("quarter", (IDENTITY, TRANSPOSE, ANTI_TRANSPOSE, ROT180))
    #: a 3x3 conv, batch 8, one CPU thread: fast/dense 1.45 at n = 16, 1.04 at 64,
    #: 0.85 at 128, 0.66 at 256
    fast_min_width = 128

    def fast_reason(self, shape: Shape, groups: int = 1) -> str | None:
        n = shape[0] // groups
        if n < self.fast_min_width:
            return (f"quarter: two {n // 2}-wide products are not faster than one {n}-wide "
                    f"(fast form from n = {self.fast_min_width})")
        return None

    def fast_ratio(self, shape: Shape, groups: int = 1) -> float:
        n = shape[0] // groups
        h, hc = halves(n)
        return (h * h + hc * hc) / n ** 2 if self.fast_reason(shape, groups) is None else 1.0

    def fast(self, packed: torch.Tensor, shape: Shape, groups: int = 1) -> ChannelMaps:
        g, n = matrix_blocks(shape, groups)
        return quarter_maps(corner(packed, self.group, n, halves(n)[1], n), g, n)


@register_scheme
class Eighth(FlipInvariant):
    name = "eighth"
    paper_name = "eight"
    definition = "invariant under the dihedral group D4 of the (o,i) square"
    layers = "as channel"
    fraction = "≈ 1/8"
    group = SquareGroup(
        "dihedral",
        (IDENTITY, ROT90, ROT180, ROT270, TRANSPOSE, ANTI_TRANSPOSE, FLIP_LR, FLIP_UD),
    )


@register_scheme
class Flip(FlipInvariant):
    name = "flip"
    paper_name = "block4"
    definition = "invariant under left-right and up-down flips of the (o,i) square"
    layers = "as channel"
    fraction = "≈ 1/4"
    group = SquareGroup("flips", (IDENTITY, FLIP_LR, FLIP_UD, ROT180))
