"""The plan: every candidate tensor, converted or skipped with the reason, and the
parameter arithmetic. ``inspect`` returns it; ``convert`` carries it out."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from symconvert.errors import NothingEligibleError, SymconvertError
from symconvert.schemes import Scheme, get_scheme
from symconvert.surgery.fast import layer_fast_reason
from symconvert.surgery.layers import LayerHandler, TensorTarget, handler_for
from symconvert.surgery.parametrization import Symmetric, symmetric_of
from symconvert.surgery.selection import Selection, head_names

CONVERT = "convert"
SKIP = "skip"


@dataclass
class LayerPlan:
    """One candidate tensor (``module.tensor``) and what the plan does with it."""

    module: str
    tensor: str
    kind: str
    layer_type: str
    shape: list[int]
    groups: int
    scheme: str
    action: str
    reason: str | None
    params_before: int
    params_after: int
    #: relative Frobenius distance ||W - unpack(pack(W))|| / ||W|| on the source weight
    symmetrization_error: float | None = None
    aliases: list[str] = field(default_factory=list)
    #: how the scheme splits the weight, e.g. "3 blocks 384×384 (stacked)" for `block`
    note: str | None = None
    #: --scheme auto: the cost the planner weighed, and every candidate scheme's
    #: {"params_after", "saved", "cost", "symmetrization_error"}
    cost: float | None = None
    alternatives: dict | None = None
    #: relative output error on the calibration data after the least-squares fit
    #: (``convert --calibrate``), and that of the nearest symmetric weight on the same inputs
    output_error: float | None = None
    output_error_naive: float | None = None
    #: multiply-adds per output position after / before (stride 1): the scheme's fast
    #: form (``symconvert.surgery.fast``), 1.0 when the layer runs dense; and why it does
    flops_ratio: float = 1.0
    dense_reason: str | None = None

    @property
    def name(self) -> str:
        if self.tensor == "weight":
            return self.module
        return f"{self.module}.{self.tensor}" if self.module else self.tensor

    @property
    def saved(self) -> int:
        return self.params_before - self.params_after

    @property
    def converted(self) -> bool:
        return self.action == CONVERT

    def to_dict(self) -> dict:
        d = asdict(self)
        d["name"] = self.name
        return d


@dataclass
class Plan:
    scheme: str
    selection: dict
    total_before: int
    layers: list[LayerPlan]
    warnings: list[str] = field(default_factory=list)
    target_reduction: float | None = None
    #: set by calibration: samples, data spec, BatchNorm layers re-estimated, seconds
    calibration: dict | None = None

    @property
    def converted(self) -> list[LayerPlan]:
        return [entry for entry in self.layers if entry.converted]

    @property
    def skipped(self) -> list[LayerPlan]:
        return [entry for entry in self.layers if not entry.converted]

    @property
    def saved(self) -> int:
        return sum(entry.saved for entry in self.converted)

    @property
    def total_after(self) -> int:
        return self.total_before - self.saved

    @property
    def saved_fraction(self) -> float:
        return self.saved / self.total_before if self.total_before else 0.0

    def to_dict(self) -> dict:
        return {
            "scheme": self.scheme,
            "selection": self.selection,
            "target_reduction": self.target_reduction,
            "params": {
                "before": self.total_before,
                "after": self.total_after,
                "saved_fraction": self.saved_fraction,
            },
            "converted": len(self.converted),
            "skipped": len(self.skipped),
            "warnings": self.warnings,
            **({"calibration": self.calibration} if self.calibration else {}),
            "layers": [entry.to_dict() for entry in self.layers],
        }


def count_parameters(model: nn.Module) -> int:
    """Free parameters: what the optimiser trains and the checkpoint stores (a tensor
    shared by several modules counts once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # parameters() already yields a shared tensor once
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def symmetrization_error(scheme: Scheme, weight: torch.Tensor, groups: int) -> float | None:
    if weight.is_meta:
        return None
    with torch.no_grad():
        w = weight.detach().float()
        norm = w.norm()
        if norm == 0:
            return 0.0
        return float((w - scheme.project(w, groups)).norm() / norm)


@dataclass
class Candidate:
    """One tensor a layer handler offers (``module.<target.tensor>``), before any scheme is
    asked; ``reason`` says why no scheme will be (the selection, the handler, already
    converted)."""

    name: str
    module: nn.Module
    handler: LayerHandler
    target: TensorTarget
    weight: torch.Tensor
    reason: str | None
    converted: bool = False  # already carries a symmetric parametrization

    @property
    def key(self) -> str:
        """The plan's layer name: the module, or ``module.tensor`` for other tensors."""
        t = self.target.tensor
        return self.name if t == "weight" else (f"{self.name}.{t}" if self.name else t)


def candidates(model: nn.Module, selection: Selection) -> Iterator[Candidate]:
    """Every tensor a layer handler offers, in module order (tied aliases included)."""
    head = head_names(model)
    for name, module in model.named_modules():
        handler = handler_for(module)
        if handler is None:
            continue
        module_reason = selection.module_reason(name, handler.kind, head)
        for target in handler.targets(module, {"gates": selection.gates}):
            existing = symmetric_of(module, target.tensor)
            reason = module_reason or target.reason
            if existing is not None:
                reason = f"already converted ({existing.scheme.spec})"
            yield Candidate(name, module, handler, target, getattr(module, target.tensor),
                            reason, existing is not None)


def scheme_reason(candidate: Candidate, scheme: Scheme, selection: Selection) -> str | None:
    """Why ``scheme`` cannot convert the candidate under ``selection``, or None if it can
    (and saves parameters)."""
    target = candidate.target
    if candidate.reason is not None:
        return candidate.reason
    if candidate.handler.kind not in scheme.kinds:
        return f"{scheme.name} does not apply to {candidate.handler.kind} layers"
    reason = scheme.check(target.shape, target.groups)
    if reason is None and selection.min_channels and min(target.shape[:2]) < selection.min_channels:
        return f"fewer than --min-channels {selection.min_channels} channels"
    if reason is None and scheme.free_count(target.shape, target.groups) >= candidate.weight.numel():
        return "nothing to save"
    return reason


def eligible(model: nn.Module, schemes: Iterable[str | Scheme], selection: Selection
             ) -> Iterator[tuple[Candidate, list[Scheme]]]:
    """``build_plan``'s eligible entries: each candidate tensor (a tied one once) with the
    schemes among ``schemes`` that convert it; a candidate no scheme converts is left out."""
    schemes = [get_scheme(s) for s in schemes]
    seen: set[int] = set()
    for cand in candidates(model, selection):
        if not cand.converted and id(cand.weight) in seen:
            continue
        seen.add(id(cand.weight))
        ok = [s for s in schemes if scheme_reason(cand, s, selection) is None]
        if ok:
            yield cand, ok


def _entry(cand: Candidate, scheme: Scheme, reason: str | None, with_error: bool) -> LayerPlan:
    target, numel = cand.target, cand.weight.numel()
    entry = LayerPlan(
        module=cand.name, tensor=target.tensor, kind=cand.handler.kind,
        layer_type=type(cand.module).__name__.replace("Parametrized", ""),
        shape=list(target.shape), groups=target.groups, scheme=scheme.spec,
        action=CONVERT if reason is None else SKIP, reason=reason, params_before=numel,
        params_after=scheme.free_count(target.shape, target.groups) if reason is None else numel,
    )
    if reason is None:
        entry.note = scheme.describe(target.shape, target.groups)
        if target.tensor == "weight" and cand.handler.kind in ("conv", "linear"):
            entry.dense_reason = layer_fast_reason(cand.module, scheme, target.shape, target.groups)
        else:
            entry.dense_reason = f"no fast form for {cand.handler.kind} layers"
        if entry.dense_reason is None:
            entry.flops_ratio = scheme.fast_ratio(target.shape, target.groups)
        if with_error:
            entry.symmetrization_error = symmetrization_error(scheme, cand.weight, target.groups)
    return entry


def build_plan(
    model: nn.Module,
    scheme: str | Scheme,
    selection: Selection,
    target_reduction: float | None = None,
    with_error: bool = True,
) -> Plan:
    """Every candidate tensor of ``model`` with the action ``scheme`` and ``selection``
    call for. Nothing is changed."""
    scheme = get_scheme(scheme)
    entries: list[LayerPlan] = []
    by_param: dict[int, LayerPlan] = {}
    for cand in candidates(model, selection):
        if not cand.converted and id(cand.weight) in by_param:  # tied: converted once
            by_param[id(cand.weight)].aliases.append(cand.key)
            continue
        entry = _entry(cand, scheme, scheme_reason(cand, scheme, selection), with_error)
        entries.append(entry)
        by_param[id(cand.weight)] = entry
    entries.extend(_unhandled_weights(model, by_param, scheme))
    names = [name for name, module in model.named_modules() if handler_for(module) is not None]
    plan = Plan(
        scheme=scheme.spec,
        selection=selection.to_dict(),
        total_before=count_parameters(model),
        layers=entries,
        warnings=[f"--exclude {p!r} matched no layer" for p in selection.unmatched_excludes(names)],
        target_reduction=target_reduction,
    )
    if target_reduction is not None:
        apply_target(plan, target_reduction)
    return plan


def _unhandled_weights(model: nn.Module, seen: dict[int, LayerPlan],
                       scheme: Scheme) -> list[LayerPlan]:
    """Every other parameter of >= 2 dimensions a module owns directly (embeddings,
    position/class tokens, custom layers): skipped, with the reason, so that nothing a
    scheme could be asked about is silently missing from the plan."""
    out: list[LayerPlan] = []
    for name, module in model.named_modules():
        if isinstance(module, (parametrize.ParametrizationList, Symmetric)):
            continue
        handler = handler_for(module)
        for pname, param in module.named_parameters(recurse=False):
            if param.dim() < 2 or id(param) in seen:
                continue
            if handler is not None and symmetric_of(module, pname) is not None:
                continue
            kind = handler.kind if handler is not None else "other"
            module_type = type(module).__name__.replace("Parametrized", "")
            reason = (f"{module_type}.{pname} is not a layer weight symconvert converts"
                      if handler is not None else
                      f"no layer handler for {module_type} (embeddings, tokens and custom "
                      "parameters stay dense)")
            entry = LayerPlan(module=name, tensor=pname, kind=kind, layer_type=module_type,
                              shape=list(param.shape), groups=1, scheme=scheme.spec,
                              action=SKIP, reason=reason, params_before=param.numel(),
                              params_after=param.numel())
            seen[id(param)] = entry
            out.append(entry)
    return out


def apply_target(plan: Plan, fraction: float, errors: dict[str, float] | None = None) -> None:
    """Keep the eligible layers with the lowest symmetrisation error per parameter saved
    until the model has ``fraction`` fewer parameters. ``errors`` (layer name -> error,
    e.g. the calibrated output error) replaces the weight error where given."""
    if not 0 < fraction < 1:
        raise SymconvertError(f"--target-reduction must be in (0, 1), got {fraction}.")
    goal = fraction * plan.total_before
    eligible = plan.converted
    reachable = sum(e.saved for e in eligible)
    if reachable < goal:
        raise SymconvertError(
            f"--target-reduction {fraction:.1%} cannot be reached with {plan.scheme}: "
            f"converting all {len(eligible)} eligible layers saves {reachable:,} of "
            f"{plan.total_before:,} parameters ({reachable / plan.total_before:.1%}). "
            "Loosen the selection (--include-head, --layers, fewer --exclude) or choose "
            "a scheme with a smaller free fraction."
        )

    def cost(e: LayerPlan) -> float:
        err = e.symmetrization_error if e.symmetrization_error is not None else 1.0
        if errors is not None and e.name in errors:
            err = errors[e.name]
        return err / e.saved

    saved = 0
    for entry in sorted(eligible, key=cost):
        if saved >= goal:
            entry.action, entry.reason = SKIP, "not needed for --target-reduction"
            entry.params_after, entry.flops_ratio = entry.params_before, 1.0
        else:
            saved += entry.saved


def require_nonempty(plan: Plan, allow_empty: bool) -> None:
    if plan.converted or allow_empty:
        return
    reasons: dict[str, int] = {}
    for entry in plan.layers:
        reasons[entry.reason or "?"] = reasons.get(entry.reason or "?", 0) + 1
    top = "; ".join(f"{n} x {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:4])
    raise NothingEligibleError(
        f"the selection converts no layer with scheme {plan.scheme!r} "
        f"({len(plan.layers)} candidates: {top or 'no convertible layers'}). "
        "Try another scheme (see `symconvert schemes`), widen the selection, or pass "
        "--allow-empty to write the model unchanged."
    )

