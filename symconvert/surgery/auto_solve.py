"""The solver of ``--scheme auto`` (``symconvert.surgery.auto``): a multiple-choice knapsack.

Layer i takes at most one option j (a scheme) with gain g_ij (parameters saved) and cost
c_ij >= 0; minimise sum c subject to sum g >= goal. ``solve`` does

1. the Lagrangian / LP relaxation: each layer's options reduced to the lower convex hull of
   (gain, cost) from (0, 0); the hull increments taken in order of cost per parameter
   saved until the goal is met. The fractional LP optimum is a **lower bound** on the
   optimum (recorded as ``lower_bound``); the integral prefix (the critical increment
   taken whole) is feasible and costs at most lower_bound + that increment's cost;
2. a fix-up: best-improvement local search over every option (one layer, then pairs of
   layers) while the goal stays met, then dropping any layer the goal does not need, so
   the reduction overshoots the goal by less than the smallest converted layer's gain.

``solve_exact`` is the exact optimum by dynamic programming, for tests and small cases.
Every sort has a total, index-based tie-break: the same options always give the same choice.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from symconvert.errors import SymconvertError

_EPS = 1e-12


@dataclass(frozen=True)
class Option:
    """One way to convert one layer: ``gain`` parameters saved at ``cost``."""

    gain: int
    cost: float


@dataclass
class Solution:
    #: per layer the index of the chosen option, or None
    choice: list[int | None]
    gain: int
    cost: float
    goal: int
    feasible: bool
    #: the largest gain any choice reaches (every layer at its largest-gain option)
    max_gain: int
    #: the LP relaxation's optimum: no choice meeting the goal costs less (None if infeasible)
    lower_bound: float | None = None
    #: cost of the LP-greedy prefix before the fix-up (for comparison)
    greedy_cost: float | None = None


def _hull(opts: Sequence[Option]) -> list[tuple[int, float, int]]:
    """Lower convex hull of {(0, 0)} ∪ {(g_j, c_j)}, left to right, as (gain, cost, j);
    (0, 0, -1) first."""
    pts = sorted(((o.gain, o.cost, j) for j, o in enumerate(opts) if o.gain > 0),
                 key=lambda p: (p[0], p[1], p[2]))
    hull: list[tuple[int, float, int]] = [(0, 0.0, -1)]
    for p in pts:
        if p[0] == hull[-1][0]:
            continue  # same gain, cost not lower (sorted)
        while len(hull) >= 2:
            (x1, y1, _), (x2, y2, _) = hull[-2], hull[-1]
            # drop hull[-1] if it lies on or above the segment hull[-2] -> p
            if (y2 - y1) * (p[0] - x1) >= (p[1] - y1) * (x2 - x1):
                hull.pop()
            else:
                break
        hull.append(p)
    # slopes increase along the hull; with costs >= 0 and (0, 0) first they are >= 0
    return hull


def solve(options: Sequence[Sequence[Option]], goal: int, *, pair_limit: int = 4000) -> Solution:
    """Pick at most one option per layer with total gain >= ``goal`` at least total cost.

    Costs must be finite and >= 0. Returns the best choice found with the LP lower bound;
    if the goal is out of reach, ``feasible`` is False and ``choice`` is every layer at its
    largest-gain (then cheapest) option, the largest reduction there is.
    """
    n = len(options)
    _check_costs(options)
    max_choice = [_largest_gain(opts) for opts in options]
    max_gain = sum(options[i][j].gain for i, j in enumerate(max_choice) if j is not None)
    if goal <= 0:
        return Solution([None] * n, 0, 0.0, goal, True, max_gain, 0.0, 0.0)
    if max_gain < goal:
        cost = sum(options[i][j].cost for i, j in enumerate(max_choice) if j is not None)
        return Solution(max_choice, max_gain, cost, goal, False, max_gain)
    # 1. LP relaxation, 2. local moves from its rounded choice, 3. drop what is not needed
    choice, gain, greedy_cost, lower = _lp_greedy(options, goal)
    search = _LocalSearch(options, choice, gain, greedy_cost, goal, pair_limit)
    for _ in range(10 * n + 100):
        if not (search.improve_one() or search.improve_two()):
            break
    search.drop_unneeded()
    cost = search.total_cost()
    return Solution(search.choice(), search.gain, cost, goal, True, max_gain, min(lower, cost),
                    greedy_cost)


def _check_costs(options: Sequence[Sequence[Option]]) -> None:
    for opts in options:
        for o in opts:
            if not (math.isfinite(o.cost) and o.cost >= 0):
                raise SymconvertError(f"a layer cost must be a finite number >= 0, got {o.cost!r}.")


def _largest_gain(opts: Sequence[Option]) -> int | None:
    """The option of largest gain (then cheapest, then first); None for no option."""
    if not opts:
        return None
    return min(range(len(opts)), key=lambda j: (-opts[j].gain, opts[j].cost, j))


def _lp_greedy(options: Sequence[Sequence[Option]],
               goal: int) -> tuple[list[int | None], int, float, float]:
    """The LP relaxation: hull increments in order of cost per parameter saved, taken until
    the goal is met. Returns (choice, gain, cost, LP optimum = lower bound)."""
    increments = []
    for i, opts in enumerate(options):
        hull = _hull(opts)
        for step in range(1, len(hull)):
            (g0, c0, _), (g1, c1, j) = hull[step - 1], hull[step]
            increments.append(((c1 - c0) / (g1 - g0), i, step, g1 - g0, c1 - c0, j))
    increments.sort(key=lambda t: (t[0], t[1], t[2]))
    choice: list[int | None] = [None] * len(options)
    gain, cost, lower = 0, 0.0, 0.0
    for _, i, _, dg, dc, j in increments:
        if gain + dg >= goal:  # the critical increment: the LP takes a fraction of it
            lower = cost + dc * (goal - gain) / dg
        choice[i], gain, cost = j, gain + dg, cost + dc
        if gain >= goal:
            break
    return choice, gain, cost, lower


class _LocalSearch:
    """Best-improvement moves of one layer, then of two layers, from a choice that meets the
    goal; per layer ``slot`` 0 is none, ``k + 1`` its option k."""

    def __init__(self, options: Sequence[Sequence[Option]], choice: list[int | None],
                 gain: int, cost: float, goal: int, pair_limit: int) -> None:
        self.n, self.goal, self.pair_limit = len(options), goal, pair_limit
        self.gains = [[0] + [o.gain for o in opts] for opts in options]
        self.costs = [[0.0] + [o.cost for o in opts] for opts in options]
        self.slot = [0 if c is None else c + 1 for c in choice]
        self.gain, self.cost = gain, cost

    def improve_one(self) -> bool:
        gains, costs, slot = self.gains, self.costs, self.slot
        best = None
        for i in range(self.n):
            g0, c0 = gains[i][slot[i]], costs[i][slot[i]]
            for s in range(len(gains[i])):
                dg, dc = gains[i][s] - g0, costs[i][s] - c0
                if (s != slot[i] and self.gain + dg >= self.goal
                        and dc < -_EPS * max(1.0, self.cost)):
                    if best is None or dc < best[0]:
                        best = (dc, dg, i, s)
        if best is None:
            return False
        dc, dg, i, s = best
        slot[i], self.gain, self.cost = s, self.gain + dg, self.cost + dc
        return True

    def improve_two(self) -> bool:
        gains, costs, slot = self.gains, self.costs, self.slot
        layer, dgs, dcs, slots = [], [], [], []
        for i in range(self.n):
            g0, c0 = gains[i][slot[i]], costs[i][slot[i]]
            for s in range(len(gains[i])):
                if s != slot[i]:
                    layer.append(i), slots.append(s)
                    dgs.append(gains[i][s] - g0), dcs.append(costs[i][s] - c0)
        m = len(layer)
        if m < 2 or m > self.pair_limit:
            return False
        lay = torch.tensor(layer)
        dg = torch.tensor(dgs, dtype=torch.float64)
        dc = torch.tensor(dcs, dtype=torch.float64)
        total_dg = dg[:, None] + dg[None, :]
        total_dc = dc[:, None] + dc[None, :]
        ok = (lay[:, None] < lay[None, :]) & (self.gain + total_dg >= self.goal)
        ok &= total_dc < -_EPS * max(1.0, self.cost)
        if not bool(ok.any()):
            return False
        masked = torch.where(ok, total_dc, torch.full_like(total_dc, math.inf))
        flat = int(torch.argmin(masked.reshape(-1)))  # first minimum: deterministic
        a, b = divmod(flat, m)
        for k in (a, b):
            slot[layer[k]] = slots[k]
        self.gain = sum(gains[i][slot[i]] for i in range(self.n))
        self.cost = self.total_cost()
        return True

    def drop_unneeded(self) -> None:
        """Drop what the goal does not need (zero-cost layers the moves left in)."""
        gains, costs, slot = self.gains, self.costs, self.slot
        for i in range(self.n):
            if slot[i] and self.gain - gains[i][slot[i]] >= self.goal and costs[i][slot[i]] <= _EPS:
                self.gain -= gains[i][slot[i]]
                self.cost -= costs[i][slot[i]]
                slot[i] = 0

    def total_cost(self) -> float:
        return sum(self.costs[i][self.slot[i]] for i in range(self.n))

    def choice(self) -> list[int | None]:
        return [None if s == 0 else s - 1 for s in self.slot]


def solve_exact(options: Sequence[Sequence[Option]], goal: int, max_states: int = 2_000_000) -> Solution:
    """The exact optimum by dynamic programming over Pareto-optimal (gain, cost) states
    (gain capped at ``goal``). For tests and small cases; raises if the state set grows
    past ``max_states``."""
    n = len(options)
    # states: gain -> (cost, choice tuple); keep only Pareto-optimal ones
    states: dict[int, tuple[float, tuple]] = {0: (0.0, ())}
    for opts in options:
        nxt: dict[int, tuple[float, tuple]] = {}
        for g, (c, ch) in states.items():
            for j, o in itertools.chain([(None, Option(0, 0.0))], enumerate(opts)):
                ng, nc = min(goal, g + o.gain), c + o.cost
                if ng not in nxt or nc < nxt[ng][0] - 1e-15:
                    nxt[ng] = (nc, ch + (j,))
        # Pareto prune: a state with more gain must cost more
        pruned, best = {}, math.inf
        for g in sorted(nxt, reverse=True):
            if nxt[g][0] < best - 1e-15:
                pruned[g], best = nxt[g], nxt[g][0]
        states = pruned
        if len(states) > max_states:
            raise SymconvertError(f"solve_exact: more than {max_states} states")
    if goal not in states:
        return Solution([None] * n, 0, math.inf, goal, False, 0)
    cost, choice = states[goal]
    gain = sum(options[i][j].gain for i, j in enumerate(choice) if j is not None)
    return Solution(list(choice), gain, cost, goal, True, 0, cost)
