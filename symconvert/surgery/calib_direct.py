"""Calibration's direct solves (``symconvert.surgery.calib_solve``) for the schemes whose
constraint is "every n × n tap block symmetric": ``channel`` (per conv group) and ``block``
stacked along the output (r square blocks over the same input, LSTM/GRU gates included).

The fit min ‖W X − Y‖² (+ damping, already folded into the moments H = X Xᵀ, C = Y Xᵀ)
over W with every tap block symmetric has the stationarity condition sym(W H) = sym(C)
tap by tap. A bias fitted with the weight is eliminated first (Schur complement: the best
bias for any W is (Σy − W Σx)/N, so the weight's problem is the centred one).

* One tap (linear layers, 1 × 1 convs): the condition is the Lyapunov equation
  W H + H W = C + Cᵀ. With H = Q Λ Qᵀ its solution is W = Q ((Qᵀ (C + Cᵀ) Q)ᵢⱼ / (λᵢ + λⱼ)) Qᵀ:
  one eigendecomposition, exact.
* k × k taps: the taps are coupled through H's off-diagonal blocks. Conjugate gradients in
  the symmetric subspace (a rotation of the taps keeps every tap block symmetric),
  preconditioned by H's block diagonal in the basis of tap modes that diagonalises the
  T × T tap correlation A: each mode's n × n channel correlation is inverted exactly (one
  eigendecomposition, then a Lyapunov division), the coupling between modes is left to CG.
  Stopped when the estimated distance to the optimum, rᵀM⁻¹r, is under ``rel_tol`` × the
  current error. (The earlier preconditioner, one channel correlation for all taps, i.e. a
  Kronecker product A ⊗ B, took 2–6× the steps on ResNet-44 and resnet50.)
"""

from __future__ import annotations

import torch

from symconvert.schemes import Scheme
from symconvert.schemes.base import prod


def tap_layout(scheme: Scheme, shape: tuple[int, ...], conv_groups: int) -> tuple[int, int, int] | None:
    """(r, n, taps) when ``scheme`` on a weight of ``shape`` (viewed as ``conv_groups`` groups
    of [m, n·taps]) means r stacked n × n blocks, each symmetric tap by tap; else None."""
    out, inp = shape[0], shape[1]
    taps = prod(shape[2:]) if len(shape) > 2 else 1
    m = out // conv_groups
    if scheme.name == "channel" and m == inp:
        return 1, inp, taps
    if scheme.name == "block" and conv_groups == 1 and out >= inp and out % inp == 0 and inp >= 2:
        return out // inp, inp, taps
    return None


def _sym(x: torch.Tensor) -> torch.Tensor:
    return (x + x.transpose(-1, -2)) / 2


def eliminate_bias(h: torch.Tensor, c: torch.Tensor, yy: float):
    """The weight's problem once the bias (H's and C's last column) is solved for:
    (H', C', yy', recover) with recover(W) the best bias for W, flat."""
    hbb = h[:, -1, -1]                       # [g]  (rows + damping)
    hx = h[:, :-1, -1]                       # [g, d]  Σx
    cy = c[:, :, -1]                         # [g, m]  Σy (+ damping pull)
    h2 = h[:, :-1, :-1] - hx[:, :, None] * hx[:, None, :] / hbb[:, None, None]
    c2 = c[:, :, :-1] - cy[:, :, None] * hx[:, None, :] / hbb[:, None, None]
    yy2 = yy - float((cy.pow(2) / hbb[:, None]).sum())

    def recover(w: torch.Tensor) -> torch.Tensor:
        return ((cy - torch.einsum("gmd,gd->gm", w, hx)) / hbb[:, None]).reshape(-1)
    return h2, c2, yy2, recover


class TapSolver:
    """The fit of W [g, r·n, n·T] (column index i·T + t) with every tap block symmetric."""

    def __init__(self, r: int, n: int, taps: int) -> None:
        self.r, self.n, self.t = r, n, taps
        self.iterations = 0

    def to5(self, w: torch.Tensor) -> torch.Tensor:
        """[g, r·n, n·T] -> [g, r, T, n(out), n(in)]."""
        g = w.shape[0]
        return w.reshape(g, self.r, self.n, self.n, self.t).permute(0, 1, 4, 2, 3)

    def from5(self, w5: torch.Tensor) -> torch.Tensor:
        g = w5.shape[0]
        return w5.permute(0, 1, 3, 4, 2).reshape(g, self.r * self.n, self.n * self.t)

    def solve(self, h: torch.Tensor, c: torch.Tensor, yy: float, w0: torch.Tensor, *,
              max_iter: int, rel_tol: float) -> torch.Tensor:
        """W minimising tr(W H Wᵀ) − 2 tr(C Wᵀ) + yy in the constraint set, from ``w0``."""
        self.iterations = 0
        if self.t == 1:
            return self._lyapunov(h, c)
        return self._pcg(h, c, yy, w0, max_iter, rel_tol)

    def _lyapunov(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        lam, q = torch.linalg.eigh(h)                        # [g, n], [g, n, n]
        lam = lam.clamp_min(1e-12 * lam[:, -1:].clamp_min(1e-300))
        s = self.to5(c)[:, :, 0]                             # [g, r, n, n]
        s = s + s.transpose(-1, -2)
        qe = q[:, None]
        s = qe.transpose(-1, -2) @ s @ qe
        s = s / (lam[:, None, :, None] + lam[:, None, None, :])
        return self.from5((qe @ s @ qe.transpose(-1, -2))[:, :, None])

    def _pcg(self, h, c, yy, w0, max_iter, rel_tol):
        n, t = self.n, self.t
        g = h.shape[0]
        h6 = h.reshape(g, n, t, n, t)
        a = torch.einsum("gitis->gts", h6)                               # tap correlation
        _, p = torch.linalg.eigh(a)
        # the channel correlation of each tap mode (a's eigenvectors): H's diagonal blocks
        # in the basis that decorrelates the taps, each inverted exactly (a Lyapunov division)
        hq = torch.einsum("gitjs,gtq,gsq->gqij", h6, p, p)
        beta, u = torch.linalg.eigh(hq)                                  # [g, T, n], [g, T, n, n]
        beta = beta.clamp_min(1e-12 * beta[..., -1:].clamp_min(1e-300))
        denom = beta[:, None, :, :, None] + beta[:, None, :, None, :]
        # the operator and the preconditioner in float32 (twice float64's speed; their
        # rounding, ~1e-7 relative, is far below the stopping tolerance); CG's own
        # recurrences stay in float64
        h32, p32, ue, denom = h.float(), p.float(), u[:, None].float(), denom.float()

        def apply(w5):
            return _sym(self.to5(self.from5(w5).float() @ h32)).double()

        def precondition(r5):
            rq = torch.einsum("gtq,grtij->grqij", p32, r5.float())
            v = 2 * (ue.transpose(-1, -2) @ rq @ ue) / denom
            v = ue @ v @ ue.transpose(-1, -2)
            return torch.einsum("gtq,grqij->grtij", p32, v).double()

        rhs = _sym(self.to5(c))
        x = self.to5(w0)
        r = rhs - apply(x)
        z = precondition(r)
        d = z
        rz = float((r * z).sum())
        for _ in range(max_iter):
            err = float((x * (-r - rhs)).sum()) + yy     # the current squared error
            if rz <= rel_tol * max(err, 1e-300):
                break
            self.iterations += 1
            ad = apply(d)
            dad = float((d * ad).sum())
            if dad <= 0:
                break
            alpha = rz / dad
            x = x + alpha * d
            r = r - alpha * ad
            z = precondition(r)
            rz_new = float((r * z).sum())
            d = z + (rz_new / max(rz, 1e-300)) * d
            rz = rz_new
        return self.from5(x)


__all__ = ["TapSolver", "eliminate_bias", "tap_layout"]
