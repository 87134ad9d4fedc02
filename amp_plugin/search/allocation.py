"""Global allocation: every MLP's kept size chosen at once from per-block distortion
curves by an exact knapsack, then checked by one evaluation of the jointly cut model.

    Curve              one MLP's distortion (the search measure minus the original
                       model's value) with that MLP alone cut, the others whole, at grid
                       sizes; measured on the cached states entering its block, so a
                       point runs only the blocks from there on
    GlobalAllocation   the settings: grid unit, coarse points, refinement rounds, the
                       images the curves are measured on, verifications
    global_allocation  coarse curves -> solve -> measure the grid points next to the
                       chosen sizes -> solve again ... -> verify the joint model

Budget mode (a `Target`): the least summed distortion among the sizes that keep the
target's measure within its tolerance. When no sizes on the measured grid land in that
window and the sizes are free (no `round_to`), sizes within the grid cells around the
closest solution are allowed, their distortion interpolated linearly between the
measured neighbours (the allocation records which).
Threshold mode: the fewest MLP parameters kept whose summed distortion is at most the
threshold; when the verified distortion of the joint model exceeds the threshold (the
blocks interact), the limit is tightened and the allocation solved again, at most
`max_verifications` times.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..core.mlp import MLPView
from ..utils.progress import Bar
from .budget import SizeModel, Target, check_goal
from .greedy import (
    Candidate,
    EntropyEval,
    finite_value,
    keep_order,
    kept_neurons,
    measure_label,
)
from .knapsack import Solution, closest_weight, least_cost, least_weight

ALLOCATIONS = ("greedy", "global")


@dataclass(frozen=True)
class GlobalAllocation:
    """Settings of the global allocation.

    grid              curves are measured at multiples of this many neurons (a `round_to`
                      given to the pruner is used instead, and then also binds the sizes)
    coarse_points     points per curve measured first, evenly spaced
    refine_rounds     rounds measuring the grid points next to the chosen sizes (each
                      halves the spacing there), per solve
    curve_images      validation images the curves are measured on (the first batches;
                      None: all); the verification always uses all of them
    max_verifications joint evaluations at most (threshold mode tightens between them)
    """

    grid: int = 8
    coarse_points: int = 8
    refine_rounds: int = 8
    curve_images: int | None = None
    max_verifications: int = 3

    def __post_init__(self):
        for key in ("grid", "coarse_points", "max_verifications"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"allocation {key} must be a positive integer, got "
                                 f"{getattr(self, key)!r}")
        if not isinstance(self.refine_rounds, int) or self.refine_rounds < 0:
            raise ValueError(f"allocation refine_rounds must be an integer >= 0, got "
                             f"{self.refine_rounds!r}")
        if self.curve_images is not None and (not isinstance(self.curve_images, int)
                                              or self.curve_images < 1):
            raise ValueError(f"allocation curve_images must be a positive integer or None, "
                             f"got {self.curve_images!r}")

    @classmethod
    def parse(cls, spec: str | GlobalAllocation | Mapping | None) -> GlobalAllocation | None:
        """None for the greedy search ("greedy" or None), the settings for "global", a
        GlobalAllocation or a dict of its fields."""
        if spec is None or spec == "greedy":
            return None
        if spec == "global":
            return cls()
        if isinstance(spec, cls):
            return spec
        if isinstance(spec, Mapping):
            unknown = set(spec) - set(cls.__dataclass_fields__)
            if unknown:
                raise ValueError(f"allocation: unknown setting {sorted(unknown)[0]!r}; "
                                 f"expected {', '.join(cls.__dataclass_fields__)}")
            return cls(**spec)
        raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)} or "
                         f"GlobalAllocation settings, got {spec!r}")


@dataclass
class Curve:
    name: str
    index: int  # position of the MLP among all MLPs of the tower
    hidden: int
    points: dict[int, float] = field(default_factory=dict)  # size -> distortion, measured

    def known(self) -> list[int]:
        """Measured sizes and the full size (distortion 0 by definition), ascending."""
        return sorted({*self.points, self.hidden})

    def at(self, size: int) -> float:
        """The distortion at `size`: measured, or linear between the measured neighbours."""
        if size == self.hidden:
            return 0.0
        if size in self.points:
            return self.points[size]
        known = self.known()
        lo = max((k for k in known if k < size), default=None)
        hi = min(k for k in known if k > size)
        if lo is None:
            return self.points.get(hi, 0.0)
        f_lo, f_hi = self.points[lo], (0.0 if hi == self.hidden else self.points[hi])
        return f_lo + (f_hi - f_lo) * (size - lo) / (hi - lo)

    def to_dict(self) -> dict:
        sizes = sorted(self.points)
        return {"index": self.index, "hidden": self.hidden, "sizes": sizes,
                "distortion": [self.points[s] for s in sizes]}


def coarse_sizes(hidden: int, unit: int, points: int) -> list[int]:
    """`points` evenly spaced sizes on multiples of `unit`, at least `unit`, below `hidden`."""
    sizes = {min(hidden, max(unit, round(g * hidden / points / unit) * unit))
             for g in range(1, points + 1)}
    return sorted(s for s in sizes if s < hidden)


def _between(lo: int, hi: int | None, unit: int) -> int | None:
    """The multiple of `unit` halfway between lo and hi (exclusive), if any."""
    if hi is None:
        return None
    mid = round((lo + hi) / 2 / unit) * unit
    return mid if lo < mid < hi and mid >= unit else None


@dataclass
class Verification:
    limit: float | None  # threshold mode: the summed-distortion limit solved for
    hidden_sizes: dict[str, int]
    predicted: float  # summed distortion of the curves at these sizes
    verified: float  # distortion of the jointly cut model, all validation images
    entropy: float  # validation entropy of the jointly cut model
    achieved: float  # the budgeted measure (mlp_params in threshold mode) at these sizes


@dataclass
class GlobalOutcome:
    hidden_sizes: dict[str, int]
    keep: dict[str, torch.Tensor | None]
    entropy: dict[str, float]
    evaluations: int
    record: dict[str, Any]


class GlobalSearch:
    """One global allocation over the MLPs `views` (see the module docstring)."""

    def __init__(self, views: Mapping[str, MLPView], scores: Mapping[str, torch.Tensor],
                 evaluate: EntropyEval, candidate: Candidate, size_model: SizeModel,
                 settings: GlobalAllocation, round_to: int | None = None,
                 index_of: Mapping[str, int] | None = None, show_progress: bool = True,
                 log: Callable[[str], None] | None = None):
        self.views, self.scores, self.evaluate = views, scores, evaluate
        self.candidate, self.size_model, self.settings = candidate, size_model, settings
        self.unit = round_to or settings.grid
        self.free_sizes = round_to is None
        index_of = index_of or {n: i for i, n in enumerate(views)}
        self.curves = {n: Curve(n, index_of[n], v.hidden) for n, v in views.items()}
        self.order = {n: keep_order(scores[n]).to(v.output.weight.device)
                      for n, v in views.items()}
        self.show_progress = show_progress
        self.log = log or (lambda msg: None)
        self.what = measure_label(evaluate.measure.name)
        self.curve_batches = evaluate.batches_for(settings.curve_images)
        self.evaluations = 0
        self.forwards = {"curves": 0, "verification": 0}
        positions = evaluate.block_of or {}
        self.first = min(views, key=lambda n: positions.get(n, 0))  # runs the most blocks
        self.last = max(views, key=lambda n: positions.get(n, 0))  # runs the fewest

    # ---- measuring ------------------------------------------------------------------------
    def _value(self, name: str, batches: int | None, entropy: bool = False,
               key: str = "curves"):
        before = self.evaluate.block_forwards
        value, ent = self.evaluate.values(name, batches, entropy)
        self.evaluations += 1
        self.forwards[key] += self.evaluate.block_forwards - before
        return value, ent

    def _bases(self) -> None:
        """The original model's value on the curve images and on all images."""
        value, ent = self._value(self.last, None, entropy=True)
        self.base_all, self.entropy_before = finite_value(value, self.last, 0, self.what,
                                                          "the original model"), ent
        self.base_curves = self.base_all
        if self.curve_batches is not None and self.curve_batches < len(
                self.evaluate.val_batches):
            self.base_curves = self._value(self.last, self.curve_batches)[0]

    def measure(self, points: Mapping[str, list[int]], label: str) -> int:
        """Measure the curves at `points` ({MLP: sizes}), last block first (its states are
        freed first when the cache is checkpointed); returns how many were measured."""
        todo = {n: sorted(set(s) - set(self.curves[n].points)) for n, s in points.items()}
        total = sum(len(s) for s in todo.values())
        if not total:
            return 0
        with Bar(f"AMP curves ({label})", total, self.show_progress) as bar:
            for name in list(self.views)[::-1]:
                for size in todo.get(name, []):
                    bar.note(f"{name}: size {size}/{self.views[name].hidden}")
                    with self.candidate(name, self.views[name], self.order[name][:size]):
                        value = self._value(name, self.curve_batches)[0]
                    self.curves[name].points[size] = finite_value(value, name, size,
                                                             self.what) - self.base_curves
                    bar.advance()
                if todo.get(name):
                    self.evaluate.release(name)
        return total

    def refinement(self, sizes: Mapping[str, int]) -> dict[str, list[int]]:
        """The grid points next to each chosen size not measured yet: halfway to its
        measured neighbours, or the grid points around a size between them."""
        out = {}
        for name, c in sizes.items():
            curve, u = self.curves[name], self.unit
            known = curve.known()
            if c in known:
                lo = max((k for k in known if k < c), default=0)
                hi = min((k for k in known if k > c), default=None)
                new = {_between(lo, c, u), _between(c, hi, u)}
            else:  # an interpolated size: the grid points around it
                new = {c // u * u, -(-c // u) * u}
            new = {s for s in new if s is not None and u <= s < curve.hidden
                   and s not in curve.points}
            if new:
                out[name] = sorted(new)
        return out

    # ---- solving --------------------------------------------------------------------------
    def _groups(self, measure: str, extra: Mapping[str, list[int]] | None = None):
        per = self.size_model.per_neuron[measure]
        names = list(self.views)
        options = {n: sorted({*self.curves[n].known(), *(extra or {}).get(n, [])})
                   for n in names}
        groups = [[(round(s * per[n]), self.curves[n].at(s)) for s in options[n]]
                  for n in names]
        return names, options, groups

    def _fixed(self, measure: str) -> float:
        per = self.size_model.per_neuron[measure]
        return self.size_model.before[measure] - sum(self.curves[n].hidden * per[n]
                                                     for n in self.views)

    def _sizes(self, names, options, sol: Solution) -> dict[str, int]:
        return {n: options[n][j] for n, j in zip(names, sol.choice, strict=True)}

    def solve_budget(self, target: Target, goal: float) -> tuple[dict[str, int], Solution]:
        m, fixed = target.measure, self._fixed(target.measure)
        lo, hi = goal * (1 - target.tolerance) - fixed, goal * (1 + target.tolerance) - fixed
        names, options, groups = self._groups(m)
        sol = least_cost(groups, lo, hi)
        if sol is not None:
            return self._sizes(names, options, sol), sol
        near = self._sizes(names, options, closest_weight(groups, goal - fixed))
        if self.free_sizes:  # sizes within one grid unit of the closest solution's
            cells, u = {}, self.unit
            for n, c in near.items():
                known = self.curves[n].known()
                a = max((k for k in known if k < c), default=c)
                b = min((k for k in known if k > c), default=c)
                cells[n] = list(range(max(a, c - u + 1), min(b, c + u - 1) + 1))
            names, options, groups = self._groups(m, cells)
            sol = least_cost(groups, lo, hi) or closest_weight(groups, goal - fixed)
            return self._sizes(names, options, sol), sol
        sol = closest_weight(groups, goal - fixed)
        return self._sizes(names, options, sol), sol

    def solve_threshold(self, limit: float) -> tuple[dict[str, int], Solution]:
        names, options, groups = self._groups("mlp_params")
        sol = least_weight(groups, limit)  # all MLPs whole (cost 0) when nothing else is
        if sol is None:
            sol = least_weight(groups, 0.0)
        return self._sizes(names, options, sol), sol

    def _refined(self, solve: Callable[[], tuple[dict[str, int], Solution]], label: str):
        sizes, sol = solve()
        for r in range(self.settings.refine_rounds):
            if not self.measure(self.refinement(sizes), f"{label}, refinement {r + 1}"):
                break
            sizes, sol = solve()
        return sizes, sol

    def verify(self, sizes: Mapping[str, int]) -> tuple[float, float]:
        """(distortion, entropy) of the model with every MLP cut to `sizes` at once, on all
        validation images."""
        with ExitStack() as stack:
            for name, size in sizes.items():
                if size < self.views[name].hidden:
                    stack.enter_context(self.candidate(name, self.views[name],
                                                       self.order[name][:size]))
            value, ent = self._value(self.first, None, entropy=True, key="verification")
        return finite_value(value, self.first, 0, self.what,
                            "every MLP cut at once") - self.base_all, ent

    def predicted(self, sizes: Mapping[str, int]) -> float:
        return sum(self.curves[n].at(s) for n, s in sizes.items())

    # ---- the allocation -------------------------------------------------------------------
    def run(self, threshold: float, target: Target | None) -> GlobalOutcome:
        goal = None
        if target is not None:
            smallest = {n: min(self.unit, v.hidden) for n, v in self.views.items()}
            goal = check_goal(target, self.size_model, smallest,
                              f"each MLP keeps at least {self.unit} neurons (the grid unit)")
        self.evaluate.keep_states = True
        self._bases()
        self.measure({n: coarse_sizes(v.hidden, self.unit, self.settings.coarse_points)
                      for n, v in self.views.items()}, "coarse grid")
        checks: list[Verification] = []
        if target is not None:
            sizes, sol = self._refined(lambda: self.solve_budget(target, goal), "budget")
            v, ent = self.verify(sizes)
            checks.append(Verification(None, sizes, self.predicted(sizes), v, ent,
                                       self.size_model.at(target.measure, sizes)))
        else:
            limit = threshold
            for _ in range(self.settings.max_verifications):
                sizes, sol = self._refined(lambda lim=limit: self.solve_threshold(lim),
                                           f"limit {limit:.4g}")
                v, ent = self.verify(sizes)
                p = self.predicted(sizes)
                checks.append(Verification(limit, sizes, p, v, ent,
                                           self.size_model.at("mlp_params", sizes)))
                self.log(f"global allocation: limit {limit:.4g}, predicted {p:.4g}, "
                         f"verified {v:.4g} (threshold {threshold:g})")
                if v <= threshold:
                    break
                # the blocks interact: aim the summed curves lower by the excess seen
                tighter = threshold * p / v if p > 0 and v > 0 else limit - (v - threshold)
                limit = tighter if tighter < limit else limit - (v - threshold)
        return self._outcome(checks, sol, threshold, target, goal)

    def _outcome(self, checks: list[Verification], sol: Solution, threshold: float,
                 target: Target | None, goal: float | None) -> GlobalOutcome:
        message = ""
        if target is None:
            ok = [c for c in checks if c.verified <= threshold]
            chosen = min(ok, key=lambda c: c.achieved) if ok else min(
                checks, key=lambda c: c.verified)
            reached = bool(ok)
            if not ok:
                message = (f"no allocation verified at or under threshold {threshold:g} "
                           f"after {len(checks)} verifications; kept the lowest verified "
                           f"({chosen.verified:.4g})")
        else:
            chosen = checks[-1]
            reached = abs(chosen.achieved - goal) <= target.tolerance * goal
            if not reached:
                original = self.size_model.before[target.measure]
                message = (f"target {target.measure}={target.value:g} ({goal:,.0f}) not met "
                           f"within {target.tolerance:.1%}: closest reachable on the grid "
                           f"{chosen.achieved:,.0f} ({chosen.achieved / original:.1%})")
        if message:
            self.log(message)
        sizes = chosen.hidden_sizes
        measure = self.evaluate.measure.name
        images = len(self.evaluate.val_batches)
        curve_batches = self.curve_batches or images
        cache = self.evaluate.cache.block_forwards if self.evaluate.cache else 0
        record: dict[str, Any] = {
            "measure": measure, "mode": "budget" if target is not None else "threshold",
            "grid": self.unit, "sizes_on_grid": not self.free_sizes,
            "coarse_points": self.settings.coarse_points,
            "refine_rounds": self.settings.refine_rounds,
            "curve_batches": curve_batches, "validation_batches": images,
            "curves": {n: c.to_dict() for n, c in self.curves.items()},
            "hidden_sizes": sizes,
            "interpolated": sorted(n for n, s in sizes.items()
                                   if s != self.curves[n].hidden
                                   and s not in self.curves[n].points),
            "predicted": chosen.predicted, "verified": chosen.verified,
            "base": {"curves": self.base_curves, "all": self.base_all},
            "solver": {"exact": sol.exact, "unit": sol.unit, "weight_error": sol.weight_error},
            "verifications": [asdict(c) for c in checks],
            "reached": reached, "message": message, "threshold": threshold,
            "evaluations": self.evaluations,
            "curve_points": sum(len(c.points) for c in self.curves.values()),
            "image_block_forwards": {**self.forwards, "cache": cache,
                                     "total": cache + sum(self.forwards.values())},
        }
        if target is not None:
            original = self.size_model.before[target.measure]
            record.update(target={"measure": target.measure, "value": target.value,
                                  "tolerance": target.tolerance},
                          goal=goal, original=original, achieved=chosen.achieved,
                          fraction=chosen.achieved / original)
        keep = {n: kept_neurons(self.scores[n], s) for n, s in sizes.items()}
        return GlobalOutcome(sizes, keep, {"before": self.entropy_before,
                                           "after": chosen.entropy},
                             self.evaluations, record)


def global_allocation(views: Mapping[str, MLPView], scores: Mapping[str, torch.Tensor],
                      evaluate: EntropyEval, candidate: Candidate, size_model: SizeModel,
                      settings: GlobalAllocation, threshold: float,
                      target: Target | None = None, round_to: int | None = None,
                      index_of: Mapping[str, int] | None = None, show_progress: bool = True,
                      log: Callable[[str], None] | None = None) -> GlobalOutcome:
    """Allocate every MLP's size at once (module docstring); candidates are applied only
    inside `candidate` contexts, so the model is as it was when this returns."""
    if not math.isfinite(threshold) or threshold < 0:
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold}")
    return GlobalSearch(views, scores, evaluate, candidate, size_model, settings, round_to,
                        index_of, show_progress, log).run(threshold, target)
