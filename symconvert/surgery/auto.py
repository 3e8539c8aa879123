"""``--scheme auto``: choose per layer which symmetry (or none) reaches ``--target-reduction``
at the least total cost.

The choice is a multiple-choice knapsack: layer i takes at most one option j (a scheme)
with gain g_ij (parameters saved) and cost c_ij (the damage, by default the squared relative
symmetrisation error e² = ||W - unpack(pack(W))||² / ||W||² on the source weight: the
fraction of the layer's weight energy the projection removes); minimise sum c subject to
sum g >= F * total. ``symconvert.surgery.auto_solve.solve`` solves it (LP relaxation with
its lower bound, then a local-search fix-up).

Why e², relative and unweighted by layer size: BatchNorm/LayerNorm make a layer's absolute
weight scale meaningless, so the error is relative; to first order the output's relative
perturbation is the sum of the layers' relative perturbations, and perturbations of
different layers are close to independent, so their squares (energies) add — the sum of
e² estimates the squared relative output error, whatever each layer's parameter count.
Measured on the packaged digits model (uncalibrated top-1 at equal reduction, see the
README) e² spreads the damage over many layers and beats e, which piles it on a few.
Any other cost (e.g. calibrated output error) comes in through ``costs=``.

Tied tensors are one candidate (the plan already folds aliases into their first user),
so their saving counts once. Every sort has a total, index-based tie-break: the same
model and arguments always give the same plan.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

from symconvert.errors import SymconvertError
from symconvert.schemes import get_scheme
from symconvert.surgery.auto_solve import Option, solve
from symconvert.surgery.plan import CONVERT, SKIP, LayerPlan, Plan, build_plan, count_parameters
from symconvert.surgery.selection import Selection

AUTO = "auto"
#: candidates of ``--scheme auto`` without ``--schemes``: the square (channel), rectangular
#: (block) and kernel (spatial) symmetries plus two stronger square ones for layers where
#: halving is cheap. ``eigen:K`` is opt-in: its saving depends on K against each width.
DEFAULT_SCHEMES = ("channel", "block", "spatial", "channel+spatial", "quarter")

CostTable = Mapping[tuple[str, str], float]
#: ``costs=``: a table {(layer_name, scheme_spec): cost}, or a function called once with
#: the eligible (layer_name, scheme_spec) pairs that returns such a table
Costs = CostTable | Callable[[list[tuple[str, str]]], CostTable]


def is_auto(scheme) -> bool:
    return isinstance(scheme, str) and scheme.strip() == AUTO


def parse_schemes(schemes: str | Sequence[str] | None) -> list[str]:
    """``"channel,block,eigen:8"`` (or a list) → canonical specs, duplicates removed."""
    if schemes is None:
        items = list(DEFAULT_SCHEMES)
    elif isinstance(schemes, str):
        items = [s.strip() for s in schemes.split(",") if s.strip()]
    else:
        items = [str(s).strip() for s in schemes]
    if not items:
        raise SymconvertError("--schemes is empty; give e.g. --schemes channel,block,spatial.")
    out: list[str] = []
    for item in items:
        if is_auto(item):
            raise SymconvertError("--schemes lists the candidates of auto; 'auto' cannot be one.")
        spec = get_scheme(item).spec
        if spec not in out:
            out.append(spec)
    return out


# ------------------------------------------------------------------ the plan


@dataclass
class AutoPlan(Plan):
    """A :class:`Plan` whose converted layers carry different schemes (``scheme == "auto"``);
    each layer's ``alternatives`` holds every candidate's cost."""

    schemes: list[str] = field(default_factory=list)
    cost_name: str = "weight error²"
    total_cost: float = 0.0
    lower_bound: float | None = None
    reachable: bool = True
    max_reduction: float = 0.0
    #: --target-flops: the goal and the fraction of the source's FLOPs the plan runs
    target_flops: float | None = None
    flops_after: float | None = None

    @property
    def scheme_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for e in self.converted:
            counts[e.scheme] = counts.get(e.scheme, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def unreachable_message(self) -> str:
        if self.target_flops is not None:
            return (
                f"--target-flops {self.target_flops:.2f} cannot be reached with --scheme auto "
                f"({', '.join(self.schemes)}): the fast forms save at most "
                f"{self.max_reduction:.1%} of the source's FLOPs. Add schemes that compute less "
                "(--schemes flip,eighth,quarter,eigen:K) or widen the selection.")
        return (
            f"--target-reduction {self.target_reduction:.1%} cannot be reached with "
            f"--scheme auto ({', '.join(self.schemes)}): the maximum reachable reduction is "
            f"{self.max_reduction:.2%} (every eligible layer with its largest-saving scheme). "
            "Lower the target, add candidates with --schemes (e.g. eighth, eigen:8), or "
            "widen the selection (--include-head, --layers)."
        )

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["auto"] = {
            "schemes": self.schemes,
            "cost": self.cost_name,
            "total_cost": self.total_cost,
            "lower_bound": self.lower_bound,
            "reachable": self.reachable,
            "max_reduction": self.max_reduction,
            "scheme_counts": self.scheme_counts,
            "target_flops": self.target_flops,
            "flops_after": self.flops_after,
        }
        return d


def weight_cost(error: float | None) -> float:
    """The default cost of a conversion: the squared relative symmetrisation error (1.0,
    the worst, when it cannot be measured: meta tensors)."""
    return 1.0 if error is None else float(error) ** 2


def _scheme_plans(model: nn.Module, schemes: list[str], selection: Selection,
                  with_error: bool) -> list[Plan]:
    return [build_plan(model, s, selection, None, with_error=with_error) for s in schemes]


def candidates(
    model: nn.Module,
    schemes: str | Sequence[str] | None = None,
    *,
    include=None, exclude=None, layers=None, min_channels: int = 0,
    include_head: bool = False, gates=None,
) -> list[tuple[str, str]]:
    """The (layer_name, scheme_spec) pairs ``--scheme auto`` would weigh: what a cost
    function (e.g. calibration) must price. Layer names are the plan's (``layer1.0.conv1``,
    ``lstm.weight_hh_l0``)."""
    selection = Selection.build(include, exclude, layers, min_channels, include_head, gates)
    plans = _scheme_plans(model, parse_schemes(schemes), selection, with_error=False)
    return [(e.name, p.scheme) for p in plans for e in p.converted]


def _resolve_costs(costs: Costs, pairs: list[tuple[str, str]],
                   alt_names: dict[tuple[str, str], str],
                   partial: bool = False) -> dict[tuple[str, str], float]:
    table = costs(list(pairs)) if callable(costs) else costs
    if not isinstance(table, Mapping):
        raise SymconvertError("costs= must be a mapping {(layer_name, scheme): cost} or a "
                              "function returning one.")
    norm: dict[tuple[str, str], float] = {}
    for key, value in table.items():
        try:
            name, scheme = key
        except (TypeError, ValueError):
            raise SymconvertError(f"costs= key {key!r} is not a (layer_name, scheme) pair.") from None
        norm[(str(name), get_scheme(scheme).spec)] = value
    out, missing = {}, []
    for pair in pairs:
        value = norm.get(pair, norm.get((alt_names.get(pair, ""), pair[1])))
        if value is None:
            missing.append(pair)
            continue
        value = float(value)
        if not (math.isfinite(value) and value >= 0):
            raise SymconvertError(f"costs= gives {pair[0]} with {pair[1]} the cost {value!r}; "
                                  "costs must be finite and >= 0.")
        out[pair] = value
    if missing and not partial:
        shown = ", ".join(f"({n!r}, {s!r})" for n, s in missing[:3])
        raise SymconvertError(f"costs= has no cost for {len(missing)} eligible (layer, scheme) "
                              f"pairs, e.g. {shown}; price every pair of symconvert.surgery.auto.candidates().")
    return out


def _skip_reason(entries: list[LayerPlan]) -> str:
    reasons = []
    for e in entries:
        r = e.reason or "?"
        if r not in [x[1] for x in reasons]:
            reasons.append((e.scheme, r))
    if len(reasons) == 1:
        return reasons[0][1]
    return "no candidate applies: " + "; ".join(f"{s}: {r}" for s, r in reasons)


def build_auto_plan(
    model: nn.Module,
    selection: Selection,
    target_reduction: float | None,
    schemes: str | Sequence[str] | None = None,
    costs: Costs | None = None,
    cost_name: str | None = None,
    flops=None,
) -> AutoPlan:
    """The ``--scheme auto`` plan: per candidate tensor the chosen scheme (or none) and
    every candidate's cost. Nothing is changed. An unreachable target gives a plan with
    ``reachable=False`` showing the largest reduction (``convert`` refuses it).
    ``flops`` (a ``symconvert.surgery.auto_flops.FlopsTarget``) replaces the parameter
    target by a FLOPs target: each option's gain is the FLOPs its fast form saves."""
    if flops is None:
        _check_target(target_reduction)
    specs = parse_schemes(schemes)
    # a partial cost table (``costs.partial``, e.g. calibration, which prices conv and
    # linear layers) falls back to the weight error for the pairs it leaves out
    partial = bool(getattr(costs, "partial", False))
    plans = _scheme_plans(model, specs, selection, with_error=costs is None or partial)
    keys = [(e.module, e.tensor) for e in plans[0].layers]
    by_scheme = [{(e.module, e.tensor): e for e in p.layers} for p in plans]
    table = None if costs is None else _cost_table(costs, plans, partial)
    gain = None if flops is None else (lambda e: flops.gain(e.module, e.flops_ratio))
    options, option_entries = _layer_options(keys, by_scheme, table, gain)

    total = count_parameters(model)
    goal = flops.goal if flops is not None else math.ceil(target_reduction * total - 1e-9)
    sol = solve(options, goal)
    scale = flops.total if flops is not None else total
    entries = [_auto_entry(key, opts, ents, j, by_scheme)
               for key, opts, ents, j in zip(keys, options, option_entries, sol.choice,
                                             strict=True)]
    return AutoPlan(
        scheme=AUTO, selection=selection.to_dict(), total_before=total, layers=entries,
        warnings=list(plans[0].warnings), target_reduction=target_reduction, schemes=specs,
        cost_name=cost_name or ("weight error²" if costs is None else getattr(costs, "name", "given costs")),
        total_cost=sol.cost, lower_bound=sol.lower_bound, reachable=sol.feasible,
        max_reduction=sol.max_gain / scale if scale else 0.0,
        target_flops=None if flops is None else flops.fraction,
        flops_after=None if flops is None else (flops.total - sol.gain) / flops.total,
    )


def _check_target(target_reduction: float | None) -> None:
    if target_reduction is None:
        raise SymconvertError("--scheme auto needs --target-reduction F (e.g. 0.4): the "
                              "planner picks per layer the cheapest schemes that reach it.")
    if not 0 < target_reduction < 1:
        raise SymconvertError(f"--target-reduction must be in (0, 1), got {target_reduction}.")


def _cost_table(costs: Costs, plans: list[Plan], partial: bool) -> dict[tuple[str, str], float]:
    """The given costs of every (layer, scheme) candidate the plans convert."""
    pairs = [(e.name, p.scheme) for p in plans for e in p.converted]
    alt = {(e.name, p.scheme): f"{e.module}.{e.tensor}" for p in plans for e in p.converted}
    return _resolve_costs(costs, pairs, alt, partial=partial)


def _layer_options(keys: list, by_scheme: list[dict], table: dict | None, gain=None
                   ) -> tuple[list[list[Option]], list[list[LayerPlan]]]:
    """Per candidate tensor its options (saving, cost), one per scheme that converts it, and
    the plan entry of each; ``gain(entry)`` replaces the parameters saved (an option that
    gains nothing is left out)."""
    options: list[list[Option]] = []
    option_entries: list[list[LayerPlan]] = []
    for key in keys:
        opts, ents = [], []
        for by in by_scheme:
            e = by[key]
            if not e.converted:
                continue
            c = table.get((e.name, e.scheme)) if table is not None else None
            if c is None:
                c = weight_cost(e.symmetrization_error)
            # same saving at the same cost as an earlier candidate (block on a square
            # layer is channel): keep the earlier one
            g = e.saved if gain is None else gain(e)
            if g <= 0 or any(o.gain == g and o.cost == c for o in opts):
                continue
            opts.append(Option(g, c))
            ents.append(e)
        options.append(opts)
        option_entries.append(ents)
    return options, option_entries


def _auto_entry(key: tuple, opts: list[Option], ents: list[LayerPlan], j: int | None,
                by_scheme: list[dict]) -> LayerPlan:
    """The plan entry of one tensor: its chosen option ``j`` (or a skip saying why) and
    every candidate as an alternative."""
    alternatives = {
        e.scheme: {"params_after": e.params_after, "saved": e.saved, "cost": o.cost,
                   "symmetrization_error": e.symmetrization_error}
        for o, e in zip(opts, ents, strict=True)
    }
    if j is not None:
        entry = copy.deepcopy(ents[j])
    else:
        entry = copy.deepcopy(by_scheme[0][key])
        entry.scheme, entry.action = AUTO, SKIP
        entry.params_after, entry.symmetrization_error, entry.note = entry.params_before, None, None
        entry.flops_ratio, entry.dense_reason = 1.0, None
        if opts:
            cheapest = min(range(len(opts)), key=lambda k: (opts[k].cost / opts[k].gain, k))
            entry.reason = (f"not needed for --target-reduction (cheapest: "
                            f"{ents[cheapest].scheme} at {opts[cheapest].cost:.3g})")
        else:
            entry.reason = _skip_reason([by[key] for by in by_scheme])
    entry.alternatives = alternatives
    entry.cost = opts[j].cost if j is not None else None
    assert entry.action == (CONVERT if j is not None else SKIP)
    return entry


def require_reachable(plan: Plan) -> None:
    if isinstance(plan, AutoPlan) and not plan.reachable:
        raise SymconvertError(plan.unreachable_message())
