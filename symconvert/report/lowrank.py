"""The low-rank baseline of ``report --compare lowrank``: truncated SVD of every conv and
linear weight (grouped convs and the classifier head aside), each replaced by two smaller
layers, ranks chosen so that the model removes the same number of parameters as the
symmetric one.

A k×k conv ``out × in`` becomes a k×k conv to ``r`` channels then a 1×1 conv to ``out``; a
linear becomes two linears; the singular values are split evenly between the two factors
(``√S`` each). Ranks: one global energy threshold (each layer keeps the fewest singular
values holding that fraction of its energy; a layer whose factors would not be smaller
stays whole), searched by bisection, then single ranks dropped where the energy lost is
least until the budget is met to within one rank of one layer.

With calibration inputs (the ones ``convert --calibrate`` used) the SVD is whitened by
each layer's input statistics (SVD-LLM, Wang et al. 2024): ``W·L = U S Vᵀ`` with ``L`` the
Cholesky factor of the inputs' centred covariance, ``W ≈ U_r S_r V_rᵀ L⁻¹``, so the ranks
kept are the ones that matter on real inputs; the mean of the error (``(W − W_r)·μ``) goes
into the bias (a BatchNorm after the layer would otherwise shift by it), and the product is
split into factors of one scale (its own SVD). Layers that are called functionally (attention's ``out_proj``)
see no input in a forward hook and are factorised unwhitened.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from symconvert.errors import SymconvertError
from symconvert.surgery.selection import head_names

_DAMP = 1e-2  # of the covariance's mean diagonal, so that the Cholesky factor exists
_BISECT_STEPS = 30
_MAX_ROWS = 65536  # input rows per layer and batch


class LowRankError(SymconvertError):
    """Truncated SVD cannot remove the budget on this model (the message says why)."""


class Factored(nn.Module):
    """Two layers in place of one: ``second(first(x))``. ``weight``/``bias`` give the dense
    product for code that reads a layer's weight directly (attention's fused paths)."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    @property
    def weight(self) -> torch.Tensor:
        a, b = self.first.weight, self.second.weight
        return (b.flatten(1) @ a.flatten(1)).reshape(b.shape[0], *a.shape[1:])

    @property
    def bias(self) -> torch.Tensor | None:
        return self.second.bias


@dataclasses.dataclass
class SvdLayer:
    """One layer's weight as a matrix and its SVD (of ``W·L`` when whitened)."""

    name: str
    module: nn.Module
    matrix: torch.Tensor  # (out, in·k·k), whitened when calibrated
    chol: torch.Tensor | None  # L, the Cholesky factor of X·Xᵀ (None: unwhitened)
    mean: torch.Tensor | None = None  # the inputs' mean (the bias takes the error's mean)
    sigma2: torch.Tensor = dataclasses.field(init=False)
    u: torch.Tensor = dataclasses.field(init=False)
    s: torch.Tensor = dataclasses.field(init=False)
    vt: torch.Tensor = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        # float32 is accurate enough to choose and keep the leading directions, and fast
        u, s, vt = torch.linalg.svd(self.matrix.float(), full_matrices=False)
        self.u, self.s, self.vt = u.double(), s.double(), vt.double()
        self.sigma2 = self.s.double() ** 2

    @property
    def per_rank(self) -> int:
        return sum(self.matrix.shape)

    @property
    def dense(self) -> int:
        return self.matrix.numel()

    def rank_for(self, energy: float) -> int:
        """Fewest singular values holding ``energy`` of the total (0 < energy ≤ 1)."""
        cum = torch.cumsum(self.sigma2, 0) / self.sigma2.sum().clamp_min(1e-300)
        return min(int((cum < energy - 1e-12).sum()) + 1, len(self.s))

    def saved(self, rank: int | None) -> int:
        """Parameters removed at ``rank`` (a bias the mean correction adds counts)."""
        if rank is None:
            return 0
        added = self.matrix.shape[0] if self.mean is not None and self.module.bias is None else 0
        return self.dense - rank * self.per_rank - added


@dataclasses.dataclass
class LowRank:
    model: nn.Module
    removed: int
    ranks: dict[str, int]
    energy: float
    whitened: int  # layers whose SVD was whitened by calibration inputs
    step: int  # the fewest parameters one more rank dropped would remove


def eligible(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every ungrouped Conv2d and every Linear outside the classifier head."""
    head = head_names(model)
    return [(n, m) for n, m in model.named_modules() if n not in head and (
        type(m) is nn.Linear or (type(m) is nn.Conv2d and m.groups == 1))]


@dataclasses.dataclass
class InputStats:
    """Sums over a layer's inputs (a conv's unfolded patches): ``Σ x xᵀ``, ``Σ x``, count."""

    second: torch.Tensor
    first: torch.Tensor
    n: int

    @property
    def mean(self) -> torch.Tensor:
        return self.first / self.n

    @property
    def centered(self) -> torch.Tensor:
        """``Σ (x − μ)(x − μ)ᵀ``: the output error left once the bias absorbs its mean."""
        return self.second - self.n * torch.outer(self.mean, self.mean)

    def add(self, x: torch.Tensor) -> InputStats:
        return InputStats(self.second + (x.T @ x).double(), self.first + x.double().sum(0),
                          self.n + len(x))


def input_covariances(model: nn.Module, layers: list[tuple[str, nn.Module]],
                      batches: Iterable[torch.Tensor]) -> dict[str, InputStats]:
    """The ``InputStats`` of each layer's inputs over ``batches``."""
    cov: dict[str, InputStats] = {}
    rows = torch.Generator().manual_seed(0)

    def hook(name: str, module: nn.Module) -> Any:
        def record(_m: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().float()
            if isinstance(module, nn.Conv2d):
                x = F.unfold(x, module.kernel_size, module.dilation, module.padding,
                             module.stride).transpose(1, 2)
            x = x.reshape(-1, x.shape[-1])
            if len(x) > _MAX_ROWS:  # a conv's patches: a seeded sample of the positions
                x = x[torch.randperm(len(x), generator=rows)[:_MAX_ROWS]]
            d = x.shape[1]
            empty = InputStats(torch.zeros(d, d, dtype=torch.float64),
                               torch.zeros(d, dtype=torch.float64), 0)
            cov[name] = cov.get(name, empty).add(x)  # summed over batches in double
        return record

    handles = [m.register_forward_pre_hook(hook(n, m)) for n, m in layers]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # its fused kernels skip the hooks
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for h in handles:
            h.remove()
    return cov


def svd_layer(name: str, module: nn.Module, stats: InputStats | None) -> SvdLayer:
    """``module``'s SVD; with ``stats``, of ``W·L``, ``L`` the Cholesky factor of the inputs'
    centred covariance (the mean of the error goes to the bias, see ``factor_layer``)."""
    w = module.weight.detach().double().flatten(1)
    if stats is None:
        return SvdLayer(name, module, w, None)
    cov = stats.centered
    damp = _DAMP * cov.diagonal().mean().clamp_min(1e-12)
    chol = torch.linalg.cholesky(cov + damp * torch.eye(len(cov), dtype=cov.dtype))
    return SvdLayer(name, module, w @ chol, chol, stats.mean)


def _ranks(layers: list[SvdLayer], energy: float) -> dict[str, int]:
    """Each layer's rank at ``energy``, for the layers whose factors are smaller."""
    out = {}
    for layer in layers:
        rank = layer.rank_for(energy)
        if layer.saved(rank) > 0:
            out[layer.name] = rank
    return out


def _removed(layers: list[SvdLayer], ranks: dict[str, int]) -> int:
    return sum(layer.saved(ranks.get(layer.name)) for layer in layers)


def choose_ranks(layers: list[SvdLayer], budget: int) -> tuple[dict[str, int], float, int]:
    """Ranks removing ``budget`` parameters to within one rank of one layer: the highest
    global energy within the budget (bisection), then the cheapest single ranks."""
    lo, hi = 0.0, 1.0  # energy hi removes <= budget, lo removes more
    for _ in range(_BISECT_STEPS):
        mid = (lo + hi) / 2
        if _removed(layers, _ranks(layers, mid)) <= budget:
            hi = mid
        else:
            lo = mid
    ranks = _ranks(layers, hi)
    removed = _removed(layers, ranks)
    by_name = {layer.name: layer for layer in layers}
    while True:  # drop the rank whose energy (share of its layer's) is least, if it fits
        options = [(float(by_name[n].sigma2[r - 1] / by_name[n].sigma2.sum()), n)
                   for n, r in ranks.items() if r > 1
                   and removed + by_name[n].per_rank <= budget]
        if not options:
            break
        _, name = min(options)
        ranks[name] -= 1
        removed += by_name[name].per_rank
    step = min((by_name[n].per_rank for n, r in ranks.items() if r > 1), default=0)
    return ranks, hi, step


def factor_layer(layer: SvdLayer, rank: int) -> Factored:
    """The two layers of ``layer`` at ``rank``, singular values split evenly."""
    u, s, vt = layer.u[:, :rank], layer.s[:rank], layer.vt[:rank]
    if layer.chol is not None:
        # W ≈ U S (Vᵀ L⁻¹): the right factor is not orthonormal (L⁻¹ can be large where an
        # input direction is rare), so the rank-r product is balanced again by its own SVD
        # (exact at rank r): factors of one scale train well under the same fine-tuning
        right = torch.linalg.solve_triangular(layer.chol, vt, upper=False, left=False)
        q, r_ = torch.linalg.qr(right.T)  # right = r_ᵀ qᵀ
        u2, s, vt2 = torch.linalg.svd((u * s) @ r_.T, full_matrices=False)
        u, vt = u2, vt2 @ q.T
    root = s.sqrt()
    a = root[:, None] * vt  # (r, in·k·k)
    b = u * root[None, :]  # (out, r)
    m = layer.module
    dtype = m.weight.dtype
    bias = m.bias.detach().double() if m.bias is not None else None
    if layer.mean is not None:  # the error's mean on the calibration inputs, into the bias
        shift = (m.weight.detach().double().flatten(1) - (u * s) @ vt) @ layer.mean
        bias = shift if bias is None else bias + shift
    if isinstance(m, nn.Conv2d):
        first = nn.Conv2d(m.in_channels, rank, m.kernel_size, m.stride, m.padding, m.dilation,
                          bias=False, padding_mode=m.padding_mode)
        second = nn.Conv2d(rank, m.out_channels, 1, bias=bias is not None)
    else:
        first = nn.Linear(m.in_features, rank, bias=False)
        second = nn.Linear(rank, m.out_features, bias=bias is not None)
    with torch.no_grad():
        first.weight.copy_(a.reshape(first.weight.shape).to(dtype))
        second.weight.copy_(b.reshape(second.weight.shape).to(dtype))
        if bias is not None:
            second.bias.copy_(bias.to(dtype))
    return Factored(first, second).to(m.weight.device)


def factorize(model: nn.Module, budget: int,
              batches: Iterable[torch.Tensor] | None = None) -> LowRank:
    """``model`` with its eligible layers factorised (in place) to remove ``budget``
    parameters; ``batches`` (calibration inputs) whiten the SVD. Raises ``LowRankError``
    when even rank 1 everywhere cannot remove the budget."""
    targets = eligible(model)
    cov = input_covariances(model.eval(), targets, batches) if batches is not None else {}
    layers = [svd_layer(n, m, cov.get(n)) for n, m in targets]
    most = sum(max(layer.saved(1), 0) for layer in layers)
    if most < budget:
        raise LowRankError(
            f"factorising all {len(layers)} conv/linear layers outside the head to rank 1 "
            f"removes at most {most:,} parameters, short of the {budget:,} the symmetric "
            "model removes")
    ranks, energy, step = choose_ranks(layers, budget)
    modules = dict(model.named_modules())
    for layer in layers:
        if layer.name in ranks:
            parent, _, child = layer.name.rpartition(".")
            setattr(modules[parent] if parent else model, child,
                    factor_layer(layer, ranks[layer.name]))
    return LowRank(model, _removed(layers, ranks), ranks, energy,
                   sum(layer.chol is not None for layer in layers if layer.name in ranks),
                   step)


__all__ = ["Factored", "LowRank", "LowRankError", "SvdLayer", "choose_ranks", "eligible",
           "factor_layer", "factorize", "input_covariances", "svd_layer"]
