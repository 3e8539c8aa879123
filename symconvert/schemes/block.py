"""Schemes on rectangular weights: block (square symmetric blocks) and repeat."""

from __future__ import annotations

import torch

from symconvert.schemes.base import Scheme, Shape, prod
from symconvert.schemes.fast import ChannelMaps, repeat_maps
from symconvert.schemes.registry import register_scheme
from symconvert.schemes.square import Channel


def _blocks(shape: Shape) -> tuple[int, int, bool] | None:
    """(r, n, along_out): an m x n' matrix as r square n x n blocks, or None."""
    out, inp = shape[0], shape[1]
    if out >= inp and out % inp == 0:
        return out // inp, inp, True
    if inp > out and inp % out == 0:
        return inp // out, out, False
    return None


@register_scheme
class Block(Scheme):
    """W = [S_1; ...; S_r] (or [S_1 ... S_r]) with every n x n block S_j symmetric, tap by
    tap: the LSTM/GRU gate split of the paper, for any m x n weight with m = r*n."""

    name = "block"
    paper_name = "(beyond paper; its LSTM gate split)"
    definition = "m x n weight, m = r*n (or n = r*m): r square blocks, each symmetric"
    layers = "larger dim a multiple of the smaller; LSTM/GRU gate blocks"
    fraction = "≈ 1/2"

    def check(self, shape: Shape, groups: int = 1) -> str | None:
        if len(shape) < 2:
            return "weight has fewer than two dimensions"
        if groups != 1:
            # RNN gates arrive as groups; the block split already covers them.
            if shape[0] % groups or shape[0] // groups != shape[1]:
                return "grouped weight: use `channel` (per-group symmetry)"
        split = _blocks(shape)
        if split is None:
            return f"{shape[0]}x{shape[1]}: neither dimension is a multiple of the other"
        if split[1] < 2:
            return "1-wide blocks: nothing to share"
        return None

    def free_count(self, shape: Shape, groups: int = 1) -> int:
        r, n, _ = _blocks(shape)  # type: ignore[misc]
        return r * (n * (n + 1) // 2) * prod(shape[2:])

    def describe(self, shape: Shape, groups: int = 1) -> str | None:
        r, n, along_out = _blocks(shape)  # type: ignore[misc]
        if r == 1:
            return f"1 block {n}×{n}"
        return f"{r} blocks {n}×{n} ({'stacked' if along_out else 'side by side'})"

    def _to_blocks(self, weight: torch.Tensor) -> tuple[torch.Tensor, int, int, bool]:
        r, n, along_out = _blocks(tuple(weight.shape))  # type: ignore[misc]
        taps = tuple(weight.shape[2:])
        if along_out:
            return weight.reshape(r * n, n, *taps), r, n, along_out
        # [S_1 ... S_r] -> [S_1; ...; S_r]
        stacked = weight.reshape(n, r, n, *taps).transpose(0, 1).reshape(r * n, n, *taps)
        return stacked, r, n, along_out

    def pack(self, weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
        stacked, r, _, _ = self._to_blocks(weight)
        return Channel().pack(stacked, r)

    def unpack(self, packed: torch.Tensor, shape: Shape, groups: int = 1) -> torch.Tensor:
        r, n, along_out = _blocks(shape)  # type: ignore[misc]
        taps = tuple(shape[2:])
        stacked = Channel().unpack(packed, (r * n, n, *taps), r)
        if along_out:
            return stacked
        return stacked.reshape(r, n, n, *taps).transpose(0, 1).reshape(shape)


@register_scheme
class Repeat(Scheme):
    """W[j*(m/R) + o, ...] = P[o, ...] for j < R: R identical slices along the output
    dimension (the paper's `chunk`). Fast form: y[j*(m/R) + o] = (P x)[o], one slice then
    a tile (R x fewer multiply-adds; not for grouped convs, whose slices read other
    input groups)."""

    name = "repeat"
    paper_name = "chunk"
    definition = "R identical slices along the output dimension"
    layers = "out divisible by R"
    fraction = "1/R"
    example_arg = "2"

    def __init__(self, arg: str | None = None) -> None:
        if arg is None:
            raise ValueError("repeat needs the number of slices, e.g. repeat:2")
        try:
            self.r = int(arg)
        except ValueError:
            raise ValueError(f"repeat:R needs an integer R, got {arg!r}") from None
        if self.r < 2:
            raise ValueError("repeat:R needs R >= 2")

    @property
    def spec(self) -> str:
        return f"{self.name}:{self.r}"

    def check(self, shape: Shape, groups: int = 1) -> str | None:
        if shape[0] % self.r:
            return f"out {shape[0]} not divisible by R={self.r}"
        if shape[0] == self.r and len(shape) < 2:
            return "nothing to share"
        return None

    def free_count(self, shape: Shape, groups: int = 1) -> int:
        return prod(shape) // self.r

    def pack(self, weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
        return weight.reshape(self.r, weight.shape[0] // self.r, *weight.shape[1:]).mean(0)

    def unpack(self, packed: torch.Tensor, shape: Shape, groups: int = 1) -> torch.Tensor:
        return packed.repeat(self.r, *([1] * (packed.dim() - 1)))

    def fast_reason(self, shape: Shape, groups: int = 1) -> str | None:
        if groups != 1:
            return f"repeat:{self.r} on a grouped conv: each slice reads other input groups"
        return None

    def fast_ratio(self, shape: Shape, groups: int = 1) -> float:
        return 1.0 / self.r if groups == 1 else 1.0

    def fast(self, packed: torch.Tensor, shape: Shape, groups: int = 1) -> ChannelMaps:
        return repeat_maps(packed, self.r)
