"""Multiple-choice knapsack by dynamic programming: one option per group (an MLP's kept
size), each with an integer weight (what it keeps of the budgeted measure) and a cost
(its distortion); the options chosen minimise the summed cost under a weight window, or
keep the least weight under a cost limit.

The table runs over the total weight in units of the greatest common divisor of all
weights, so the optimum is exact whenever that table has at most `max_states` entries
(sizes that are multiples of `round_to` give a large common divisor: a 40-block ViT-g on
multiples of 8 needs 30,720). Beyond that the weights are rounded to a coarser unit: the
solution is then optimal for the rounded weights, and its true total weight differs
from the rounded one by at most groups x unit / 2 (returned as `weight_error`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Option = tuple[int, float]  # (weight, cost)


@dataclass
class Solution:
    choice: list[int]  # index of the option chosen in each group
    weight: int  # true total weight of the choice
    cost: float
    exact: bool
    unit: int  # weight unit of the table
    weight_error: float  # bound on |true - tabled| total weight (0 when exact)


class _Table:
    """best[w]: least cost with total weight w units; arg[g, w]: option of group g."""

    def __init__(self, groups: Sequence[Sequence[Option]], max_states: int):
        if not groups or any(not g for g in groups):
            raise ValueError("every group needs at least one option")
        weights = [int(w) for g in groups for w, _ in g]
        if any(w < 0 for w in weights):
            raise ValueError("weights must be >= 0")
        total = sum(max(int(w) for w, _ in g) for g in groups)
        unit = math.gcd(*weights) or 1
        self.exact = total // unit + 1 <= max_states
        if not self.exact:
            unit = math.ceil(total / (max_states - 1))
        self.unit, self.groups = unit, groups
        self.units = [[round(int(w) / unit) for w, _ in g] for g in groups]
        size = sum(max(u) for u in self.units) + 1
        best = np.full(size, np.inf)
        best[0] = 0.0
        self.arg = np.full((len(groups), size), -1, dtype=np.int32)
        for gi, group in enumerate(groups):
            new = np.full(size, np.inf)
            for j, ((_, cost), u) in enumerate(zip(group, self.units[gi], strict=True)):
                cand = np.full(size, np.inf)
                cand[u:] = best[:size - u] + float(cost)
                better = cand < new
                new[better] = cand[better]
                self.arg[gi, better] = j
            best = new
        self.best = best

    def backtrack(self, w: int) -> Solution:
        choice = []
        for gi in range(len(self.groups) - 1, -1, -1):
            j = int(self.arg[gi, w])
            choice.append(j)
            w -= self.units[gi][j]
        choice.reverse()
        weight = sum(int(g[j][0]) for g, j in zip(self.groups, choice, strict=True))
        cost = sum(float(g[j][1]) for g, j in zip(self.groups, choice, strict=True))
        error = 0.0 if self.exact else len(self.groups) * self.unit / 2
        return Solution(choice, weight, cost, self.exact, self.unit, error)


def least_cost(groups: Sequence[Sequence[Option]], low: float, high: float,
               max_states: int = 2_000_000) -> Solution | None:
    """The least summed cost with total weight in [low, high]; None when no choice of
    options lands in the window (ties: the heavier choice)."""
    table = _Table(groups, max_states)
    w = np.arange(len(table.best)) * table.unit
    ok = np.flatnonzero((w >= low - 1e-9) & (w <= high + 1e-9) & np.isfinite(table.best))
    if not len(ok):
        return None
    costs = table.best[ok]
    return table.backtrack(int(ok[np.flatnonzero(costs == costs.min())[-1]]))


def least_weight(groups: Sequence[Sequence[Option]], limit: float,
                 max_states: int = 2_000_000) -> Solution | None:
    """The least total weight whose least summed cost is <= `limit` (ties: that cost);
    None when no choice stays under the limit."""
    table = _Table(groups, max_states)
    ok = np.flatnonzero(table.best <= limit)
    return table.backtrack(int(ok[0])) if len(ok) else None


def closest_weight(groups: Sequence[Sequence[Option]], goal: float,
                   max_states: int = 2_000_000) -> Solution:
    """The reachable total weight nearest `goal` (ties: the lighter), at its least cost."""
    table = _Table(groups, max_states)
    ok = np.flatnonzero(np.isfinite(table.best))
    dist = np.abs(ok * table.unit - goal)
    return table.backtrack(int(ok[np.flatnonzero(dist == dist.min())[0]]))
