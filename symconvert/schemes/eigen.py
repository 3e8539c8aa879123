"""The eigen scheme: every square channel block is a rank-K symmetric matrix V diag(e) Vᵀ."""

from __future__ import annotations

import torch

from symconvert.schemes.base import Scheme, Shape, check_square_blocks, matrix_blocks, prod
from symconvert.schemes.fast import TapFactors
from symconvert.schemes.registry import register_scheme


def _blocks(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """W[g*n + o, i, taps] -> A[g, t, o, i]: one n x n matrix per block and tap."""
    g, n = matrix_blocks(tuple(weight.shape), groups)
    taps = prod(tuple(weight.shape[2:]))
    return weight.reshape(g, n, n, taps).permute(0, 3, 1, 2)


@register_scheme
class Eigen(Scheme):
    """W[g*n + o, i, t] = sum_k V[g,t,o,k] e[g,t,k] V[g,t,i,k]: per block g and tap t, a
    symmetric matrix of rank <= K (the paper's ``evd`` / ``pdpt``).

    Packed layout ``P[g, t, n+1, K]``: rows ``0..n-1`` are V (n x K), row ``n`` is e.
    ``unpack`` is differentiable in both V and e, so both train (the paper's released
    ``evd`` detached them). ``pack`` gives the Frobenius-nearest symmetric rank-K matrix:
    for symmetric S, ||W - S||² = ||(W-Wᵀ)/2||² + ||(W+Wᵀ)/2 - S||², and the best rank-K
    approximation of the symmetric part keeps its K largest-|e| eigenpairs (Eckart–Young,
    the singular values of a symmetric matrix being its |eigenvalues|).

    V is not unique (signs, rotations inside repeated eigenvalues, and any V that training
    made non-orthogonal), so ``pack(unpack(P)) == P`` does not hold; what holds is
    ``unpack(pack(unpack(P))) == unpack(P)``: the weight is a fixed point.

    Fast form: y[o] = sum_t sum_k (V e)[t,o,k] sum_i V[t,i,k] shift_t(x)[i], two thin
    products per tap (a 1x1 conv to T*K channels, then back): n / 2K x fewer
    multiply-adds at stride 1, worth it when 2K < n.
    """

    name = "eigen"
    paper_name = "evd / pdpt"
    definition = "W = V diag(e) Vᵀ per tap: the K largest-|e| eigenpairs of (W+Wᵀ)/2 (rank K)"
    layers = "as channel, K < n"
    fraction = "≈ K(n+1)/n²"
    example_arg = "16"
    is_linear = False  # V diag(e) Vᵀ: a product of its free parameters
    is_gather = False
    #: eigen:4 on a 3x3 conv, batch 8, one CPU thread: fast/dense 1.34 at n = 16, 0.98 at
    #: 32, 0.75 at 64, 0.26 at 128
    fast_min_width = 64

    def __init__(self, arg: str | None = None) -> None:
        if arg is None:
            raise ValueError("eigen needs the rank K, e.g. eigen:16")
        try:
            self.k = int(arg)
        except ValueError:
            raise ValueError(f"eigen:K needs an integer rank K, got {arg!r}") from None
        if self.k < 1:
            raise ValueError("eigen:K needs K >= 1")

    @property
    def spec(self) -> str:
        return f"{self.name}:{self.k}"

    def check(self, shape: Shape, groups: int = 1) -> str | None:
        reason = check_square_blocks(shape, groups)
        if reason is not None:
            return reason
        n = shape[0] // groups
        if self.k >= n:
            # K(n+1) >= n² exactly when K >= n: the factors would be no smaller than W
            return f"rank K={self.k} >= block size n={n}: V and e would not be smaller than W; choose K < {n}"
        return None

    def free_count(self, shape: Shape, groups: int = 1) -> int:
        g, n = matrix_blocks(shape, groups)
        return g * prod(shape[2:]) * (self.k * n + self.k)

    def pack(self, weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
        a = _blocks(weight.detach(), groups).to(torch.float64)
        evals, evecs = torch.linalg.eigh((a + a.transpose(-1, -2)) / 2)
        # The K largest |e|, largest first (a stable sort keeps ties in eigh's order).
        order = evals.abs().argsort(dim=-1, descending=True, stable=True)[..., : self.k]
        e = evals.gather(-1, order)
        v = evecs.gather(-1, order.unsqueeze(-2).expand(*evecs.shape[:-1], self.k))
        # Deterministic signs: each eigenvector's largest-magnitude entry is positive.
        peak = v.gather(-2, v.abs().argmax(dim=-2, keepdim=True))
        v = torch.where(peak < 0, -v, v)
        return torch.cat([v, e.unsqueeze(-2)], dim=-2).to(weight.dtype)

    def unpack(self, packed: torch.Tensor, shape: Shape, groups: int = 1) -> torch.Tensor:
        g, n = matrix_blocks(shape, groups)
        v, e = packed[..., :n, :], packed[..., n, :]
        a = (v * e.unsqueeze(-2)) @ v.transpose(-1, -2)  # [g, t, n, n]
        # V diag(e) Vᵀ is symmetric only up to rounding; averaging with its transpose makes
        # it exactly symmetric (IEEE addition commutes), as every other scheme's weight is.
        a = (a + a.transpose(-1, -2)) / 2
        return a.permute(0, 2, 3, 1).reshape(shape)

    def fast_reason(self, shape: Shape, groups: int = 1) -> str | None:
        n = shape[0] // groups
        if 2 * self.k >= n:
            return f"eigen:{self.k}: two products of rank {self.k} cost no less than n={n}"
        if n < self.fast_min_width:
            return (f"eigen:{self.k}: thin products on {n} channels are not faster "
                    f"(fast form from n = {self.fast_min_width})")
        return None

    def fast_ratio(self, shape: Shape, groups: int = 1) -> float:
        n = shape[0] // groups
        return 2 * self.k / n if self.fast_reason(shape, groups) is None else 1.0

    def fast(self, packed: torch.Tensor, shape: Shape, groups: int = 1) -> TapFactors:
        n = shape[0] // groups
        v, e = packed[..., :n, :], packed[..., n, :]  # (g, T, n, K), (g, T, K)
        return TapFactors(down=v.transpose(-1, -2), up=v * e.unsqueeze(-2))
