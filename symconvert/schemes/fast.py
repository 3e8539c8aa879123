"""Fast forms: symmetric weights that compute less, with ordinary dense kernels.

A scheme's fast form rewrites ``y = W x`` (``W`` the unpacked g x n x n channel blocks of
a conv or linear, one n x n matrix per tap) so that fewer multiply-adds run, exactly:

* ``ChannelMaps`` (flip, eighth, quarter, repeat:R): y = post(S_j * pre_j(x)), where
  ``pre``/``post`` are cheap channel maps (adds, flips, a tile) and the ``S_j`` smaller
  weights of the same conv (same taps, stride, padding, dilation): a channel map commutes
  with every one of them, because it acts on channels and the conv on positions.
* ``TapFactors`` (eigen:K): W_t = U_t D_t per tap t, with D_t K x n and U_t n x K, so the
  conv is y = sum_t U_t shift_t(D_t x): one 1x1 conv to T*K channels, a gather of shifted
  slices, one 1x1 conv back.

Every map here acts on dim 1 of a (B, g*n, *rest) tensor: the executors in
``symconvert.surgery.fast`` bring convs (unbatched too) and linears to that layout.
Notation: h = floor(n/2), h' = ceil(n/2), J the exchange (flip) matrix, x_t, x_m, x_b the
top h, middle (n odd) and bottom h channels of x.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Maps = Callable[[torch.Tensor], list[torch.Tensor]]
Post = Callable[[list[torch.Tensor]], torch.Tensor]


@dataclass
class ChannelMaps:
    """y = post([S_j * x_j for x_j in pre(x)]): ``weights[j]`` is a (g*a_j, b_j, *taps)
    weight of a conv with ``groups`` groups (a linear when there are no taps)."""

    weights: list[torch.Tensor]
    pre: Maps
    post: Post
    groups: int


@dataclass
class TapFactors:
    """W[g*n+o, i, t] = sum_k up[g, t, o, k] * down[g, t, k, i]."""

    down: torch.Tensor  # (g, T, K, n)
    up: torch.Tensor  # (g, T, n, K)


def halves(n: int) -> tuple[int, int]:
    """(h, h'): the floor and the ceiling of n/2."""
    return n // 2, n - n // 2


def _view(x: torch.Tensor, g: int, n: int) -> torch.Tensor:
    return x.unflatten(1, (g, n))


def fold_flip(x: torch.Tensor, g: int, n: int) -> torch.Tensor:
    """[x_t + J x_b; x_m]: the h' channels a flip-invariant W sees (W = W J)."""
    h, hc = halves(n)
    v = _view(x, g, n)
    u = v[:, :, :h] + v[:, :, hc:].flip(2)
    if hc > h:
        u = torch.cat([u, v[:, :, h:hc]], 2)
    return u.flatten(1, 2)


def unfold_flip(y: torch.Tensor, g: int, n: int) -> torch.Tensor:
    """[y_t; y_m; J y_t] from the top h' outputs (W = J W)."""
    h, hc = halves(n)
    v = _view(y, g, hc)
    return torch.cat([v, v[:, :, :h].flip(2)], 2).flatten(1, 2)


def flip_maps(small: torch.Tensor, g: int, n: int) -> ChannelMaps:
    """W = W J = J W: y = [y'; J y'_t] with y' = W[:h', :h'] [x_t + J x_b; x_m] (4x)."""
    return ChannelMaps([small], lambda x: [fold_flip(x, g, n)],
                       lambda ys: unfold_flip(ys[0], g, n), g)


def quarter_pre(x: torch.Tensor, g: int, n: int) -> list[torch.Tensor]:
    """[u; x_m] and v, with u = x_t + J x_b, v = x_t - J x_b."""
    h, hc = halves(n)
    v = _view(x, g, n)
    top, bot = v[:, :, :h], v[:, :, hc:].flip(2)
    sym = torch.cat([top + bot, v[:, :, h:hc]], 2) if hc > h else top + bot
    return [sym.flatten(1, 2), (top - bot).flatten(1, 2)]


def quarter_post(ys: list[torch.Tensor], g: int, n: int) -> torch.Tensor:
    """y_t = s_t + a, y_m = s_m, J y_b = s_t - a (the halves are in the weights)."""
    h, hc = halves(n)
    s, a = _view(ys[0], g, hc), _view(ys[1], g, h)
    top, mid = s[:, :, :h], s[:, :, h:hc]
    return torch.cat([top + a, mid, (top - a).flip(2)], 2).flatten(1, 2)


def quarter_weights(rows: torch.Tensor, n: int) -> list[torch.Tensor]:
    """From the top h' rows W[g, :h', :, taps] of a centrosymmetric W (J W J = W):
    S_sym = [[(A + C J)/2, b], [r, c]] and S_anti = (A - C J)/2, where A, b, C are the
    top h rows' left, middle and right columns and [r, c, r J] the middle row."""
    h, hc = halves(n)
    g, taps = rows.shape[0], rows.shape[3:]
    a, b, c_right = rows[:, :h, :h], rows[:, :h, h:hc], rows[:, :h, hc:]
    cj = c_right.flip(2)
    top = torch.cat([(a + cj) / 2, b], 2)
    sym = torch.cat([top, rows[:, h:hc, :hc]], 1)
    anti = (a - cj) / 2
    return [sym.reshape(g * hc, hc, *taps), anti.reshape(g * h, h, *taps)]


def quarter_maps(rows: torch.Tensor, g: int, n: int) -> ChannelMaps:
    """J W J = W: Q = [[I, J], [I, -J]]/sqrt(2) block-diagonalises W into an h' x h' and
    an h x h block (2x)."""
    return ChannelMaps(quarter_weights(rows, n), lambda x: quarter_pre(x, g, n),
                       lambda ys: quarter_post(ys, g, n), g)


def repeat_maps(packed: torch.Tensor, r: int) -> ChannelMaps:
    """W = [P; ...; P] (R slices): y = tile(P x, R) (R x)."""
    return ChannelMaps([packed], lambda x: [x],
                       lambda ys: ys[0].repeat(1, r, *([1] * (ys[0].dim() - 2))), 1)


__all__ = ["ChannelMaps", "TapFactors", "flip_maps", "fold_flip", "halves",
           "quarter_maps", "quarter_post", "quarter_pre", "quarter_weights", "repeat_maps",
           "unfold_flip"]
