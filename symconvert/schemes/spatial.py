"""Schemes on the k x k kernel: spatial, and its product with channel."""

from __future__ import annotations

import torch

from symconvert.schemes.base import (
    IDENTITY,
    TRANSPOSE,
    Scheme,
    Shape,
    SquareGroup,
    check_square_blocks,
    matrix_blocks,
    orbit_gather,
    orbit_mean,
)
from symconvert.schemes.registry import register_scheme
from symconvert.schemes.square import Channel

_KERNEL = SquareGroup("kernel-transpose", (IDENTITY, TRANSPOSE))


def _check_kernel(shape: Shape) -> str | None:
    if len(shape) != 4:
        return "spatial symmetry needs a 2-D kernel (Conv2d)"
    if shape[2] != shape[3]:
        return f"kernel {shape[2]}x{shape[3]} is not square"
    if shape[2] < 2:
        return "1x1 kernel: nothing to share"
    return None


@register_scheme
class Spatial(Scheme):
    """W[o,i,a,b] = P[o,i,orbit(a,b)]: each k x k kernel is symmetric, K = Kᵀ."""

    name = "spatial"
    paper_name = "spa"
    definition = "W[o,i,a,b] = W[o,i,b,a]"
    layers = "square kernels k >= 2, any channels, depthwise included"
    fraction = "k(k+1)/2k²"
    kinds = ("conv",)

    def check(self, shape: Shape, groups: int = 1) -> str | None:
        return _check_kernel(shape)

    def free_count(self, shape: Shape, groups: int = 1) -> int:
        return shape[0] * shape[1] * _KERNEL.orbit_count(shape[2])

    def pack(self, weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
        o, i, k, _ = weight.shape
        return orbit_mean(weight.reshape(o, i, k * k), 2, _KERNEL.orbit_images(k, weight.device))

    def unpack(self, packed: torch.Tensor, shape: Shape, groups: int = 1) -> torch.Tensor:
        return orbit_gather(packed, 2, _KERNEL, shape[2]).reshape(shape)


@register_scheme
class ChannelSpatial(Scheme):
    """W[g*n+o, i, a, b] = P[g, orbit(o,i), orbit(a,b)]: both symmetries at once (the
    product group, so the nearest weight is the two averages composed)."""

    name = "channel+spatial"
    paper_name = "tri+spa"
    definition = "W[o,i,a,b] = W[i,o,a,b] = W[o,i,b,a]"
    layers = "channel ∩ spatial"
    fraction = "≈ 1/3"
    kinds = ("conv",)

    def check(self, shape: Shape, groups: int = 1) -> str | None:
        return _check_kernel(shape) or check_square_blocks(shape, groups)

    def free_count(self, shape: Shape, groups: int = 1) -> int:
        g, n = matrix_blocks(shape, groups)
        return g * (n * (n + 1) // 2) * _KERNEL.orbit_count(shape[2])

    def pack(self, weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
        g, n = matrix_blocks(tuple(weight.shape), groups)
        k = weight.shape[2]
        chan = Channel.group
        blocks = weight.reshape(g, n * n, k * k)
        dev = weight.device
        x = orbit_mean(blocks, 1, chan.orbit_images(n, dev))
        return orbit_mean(x, 2, _KERNEL.orbit_images(k, dev))

    def unpack(self, packed: torch.Tensor, shape: Shape, groups: int = 1) -> torch.Tensor:
        g, n = matrix_blocks(shape, groups)
        x = orbit_gather(packed, 2, _KERNEL, shape[2])
        return orbit_gather(x, 1, Channel.group, n).reshape(shape)
