"""Budget mode: AMP's threshold searched until the pruned model meets a size target.

    Target        what to keep: exactly one of mlp_params, params, flops; a fraction of the
                  original (<= 1) or an absolute number, within a relative tolerance
    SizeModel     each measure as a function of the MLP hidden sizes (all three are linear
                  in every hidden size), so an outer iteration costs no counting pass
    budget_search bisection on log(threshold); every inner search is AMP's own loop
                  (`adaptive_search`) with candidates and commits as masks, over the same
                  cached validation states, so nothing is pruned until the threshold is found

The sizes of the iteration chosen are those of a plain AMP search at its threshold; the
caller then commits them physically (AMPPruner) or as masks (the NNI pruner).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, ExitStack
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.cost import count_flops, count_mlp_params, count_params
from ..core.mlp import MLPView
from .greedy import EntropyEval, adaptive_search, candidate_sizes

MEASURES = ("mlp_params", "params", "flops")


@dataclass(frozen=True)
class Target:
    """Keep `value` of `measure`: a fraction of the original when <= 1, else an absolute
    count; met when within `tolerance` (relative) of it; at most `max_searches` searches."""

    measure: str
    value: float
    tolerance: float = 0.01
    max_searches: int = 12

    def __post_init__(self):
        if self.measure not in MEASURES:
            raise ValueError(f"target: unknown measure {self.measure!r}; expected one of "
                             f"{', '.join(MEASURES)}")
        if not self.value > 0:
            raise ValueError(f"target.{self.measure} must be > 0, got {self.value}")
        if not 0 < self.tolerance < 1:
            raise ValueError(f"target.tolerance must be in (0, 1), got {self.tolerance}")
        if self.max_searches < 1:
            raise ValueError(f"target.max_searches must be >= 1, got {self.max_searches}")

    @classmethod
    def parse(cls, spec: Target | Mapping[str, Any]) -> Target:
        """A Target, or a dict like {"mlp_params": 0.6, "tolerance": 0.01}."""
        if isinstance(spec, Target):
            return spec
        spec = dict(spec)
        given = [m for m in MEASURES if spec.get(m) is not None]
        if len(given) != 1:
            raise ValueError(f"target needs exactly one of {', '.join(MEASURES)}, got "
                             f"{given or 'none'}")
        rest = {k: v for k, v in spec.items() if k not in MEASURES}
        unknown = set(rest) - {"tolerance", "max_searches"}
        if unknown:
            raise ValueError(f"target: unknown key {sorted(unknown)[0]!r}")
        return cls(given[0], float(spec[given[0]]), **rest)

    def goal(self, original: float) -> float:
        return self.value * original if self.value <= 1 else self.value


class SizeModel:
    """mlp_params, params and FLOPs of a tower as functions of its MLP hidden sizes.

    Removing hidden neuron j of an MLP removes exactly its rows/columns (and norm entries),
    so each measure falls by a fixed amount per neuron: parameters from `MLPView.param_counts`,
    FLOPs 2 x tokens x weights per neuron (biases and norms are not counted, as in
    `count_flops`), tokens read off one forward pass.
    """

    def __init__(self, tower: nn.Module, views: Mapping[str, MLPView],
                 example: torch.Tensor | None):
        self.original = {n: v.hidden for n, v in views.items()}
        self.before = {"mlp_params": count_mlp_params(tower), "params": count_params(tower)}
        per_param = {n: v.param_counts()[1] for n, v in views.items()}
        self.per_neuron: dict[str, dict[str, float]] = {"mlp_params": per_param,
                                                        "params": per_param}
        if example is not None:
            tokens: dict[str, float] = {}

            def tap(name, view):
                def hook(_m, args):
                    tokens[name] = args[0].numel() / (view.hidden * example.shape[0])
                return hook
            hooks = [v.tap.register_forward_pre_hook(tap(n, v)) for n, v in views.items()]
            try:
                self.before["flops"] = count_flops(tower, example)
            finally:
                for h in hooks:
                    h.remove()
            self.per_neuron["flops"] = {
                n: 2 * tokens[n] * (sum(lin.in_features for lin in v.inputs) * (1 + v.packed)
                                    + v.output.out_features)
                for n, v in views.items()}

    def at(self, measure: str, sizes: Mapping[str, int]) -> float:
        if measure not in self.per_neuron:
            raise ValueError(f"a {measure} target needs example inputs to count FLOPs")
        per = self.per_neuron[measure]
        return self.before[measure] - sum((self.original[n] - sizes.get(n, self.original[n]))
                                          * per[n] for n in per)


@dataclass
class OuterIteration:
    threshold: float
    achieved: float  # the target's measure at these sizes
    fraction: float  # achieved / original
    hidden_sizes: dict[str, int]
    entropy_after: float
    evaluations: int


@dataclass
class BudgetOutcome:
    target: dict
    goal: float
    original: float
    reached: bool
    chosen: int  # index into iterations
    iterations: list[OuterIteration]
    keep: dict[str, torch.Tensor | None] = field(repr=False)  # the chosen sizes' neurons
    outcome: Any = field(repr=False)  # the chosen iteration's SearchOutcome
    message: str = ""

    @property
    def threshold(self) -> float:
        return self.iterations[self.chosen].threshold

    def to_dict(self) -> dict:
        return dict(target=self.target, goal=self.goal, original=self.original,
                    reached=self.reached, threshold=self.threshold,
                    achieved=self.iterations[self.chosen].achieved,
                    fraction=self.iterations[self.chosen].fraction, message=self.message,
                    iterations=[asdict(it) for it in self.iterations])


Candidate = Callable[[str, MLPView, torch.Tensor], AbstractContextManager]


def smallest_sizes(views: Mapping[str, MLPView], max_steps: int,
                   round_to: int | None) -> dict[str, int]:
    """Sizes of a search that accepts every trial (an infinite threshold)."""
    return {n: candidate_sizes(v.hidden, max_steps, lambda s: True, round_to)
            for n, v in views.items()}


def check_goal(target: Target, model: SizeModel, smallest: Mapping[str, int], why: str
               ) -> float:
    """The goal in the measure's units; raises, before any search, when even the
    `smallest` sizes the search can reach (`why` says what bounds them) keep more than the
    goal allows, or the goal exceeds the original."""
    original = model.before[target.measure]
    goal = target.goal(original)
    low = model.at(target.measure, smallest)
    if goal * (1 + target.tolerance) < low:
        raise ValueError(
            f"target {target.measure}={target.value:g} ({goal:,.0f} of {original:,.0f}) cannot "
            f"be met: {why}; closest reachable: {low:,.0f} ({low / original:.1%})")
    if goal > original * (1 + target.tolerance):
        raise ValueError(f"target {target.measure}={target.value:g} ({goal:,.0f}) is above the "
                         f"original model's {original:,.0f}")
    return goal


def check_reachable(target: Target, model: SizeModel, views: Mapping[str, MLPView],
                    max_steps: int, round_to: int | None) -> float:
    """`check_goal` for the binary search: each MLP keeps at least 1/2^max_steps."""
    return check_goal(target, model, smallest_sizes(views, max_steps, round_to),
                      f"with max_steps={max_steps}"
                      f"{f', round_to={round_to}' if round_to else ''} each MLP keeps at least "
                      f"1/{2 ** max_steps} of its neurons")


def _next_threshold(t: float, lo: float | None, hi: float | None, tried: set[float]
                    ) -> float | None:
    """lo: a threshold that keeps too much; hi: one that keeps too little."""
    if lo is not None and hi is not None:
        nxt = hi / 10 if lo == 0 else math.sqrt(lo * hi)
        if hi / max(nxt, 1e-300) < 1.0001 or nxt in tried:
            return None
        return nxt
    if hi is None:
        return t * 10 if t > 0 else 1e-6
    if t > 1e-6:
        return t / 10
    return None if 0.0 in tried else 0.0  # threshold 0 keeps the most AMP can keep


def budget_search(
    views: Mapping[str, MLPView],
    scores: Mapping[str, torch.Tensor],
    evaluate: EntropyEval,
    candidate: Candidate,
    target: Target,
    model: SizeModel,
    threshold: float,
    max_steps: int = 6,
    round_to: int | None = None,
    index_of: Mapping[str, int] | None = None,
    show_progress: bool = True,
    log: Callable[[str], None] | None = None,
    reset: Callable[[], None] | None = None,
) -> BudgetOutcome:
    """Bisection on log(threshold), starting at `threshold`, until the sizes AMP finds keep
    the target's measure within tolerance. Commits are masks (`candidate` contexts held
    open until the search ends; `reset()`, if given, clears masks a candidate leaves
    behind), so the model is as it was when this returns."""
    log = log or (lambda msg: None)
    goal = check_reachable(target, model, views, max_steps, round_to)
    original = model.before[target.measure]
    evaluate.keep_states = True
    iterations: list[OuterIteration] = []
    keeps: list[dict] = []
    outcomes: list = []
    lo = hi = None
    t, tried = threshold, set()
    while t is not None and len(iterations) < target.max_searches:
        tried.add(t)
        keep: dict[str, torch.Tensor | None] = {}
        with ExitStack() as masks:
            def commit(name, view, k, masks=masks, keep=keep):
                keep[name] = k
                if k is not None:
                    masks.enter_context(candidate(name, view, k))
            evaluate.rewind()
            if reset is not None:
                reset()
            out = adaptive_search(views, scores, evaluate, candidate, commit, t, max_steps,
                                  round_to, index_of, show_progress,
                                  description=f"AMP search {len(iterations) + 1} "
                                              f"(threshold {t:.3g})")
        achieved = model.at(target.measure, out.hidden_sizes)
        iterations.append(OuterIteration(t, achieved, achieved / original, out.hidden_sizes,
                                         out.entropy["after"], out.evaluations))
        keeps.append(keep)
        outcomes.append(out)
        log(f"budget search {len(iterations)}: threshold {t:.4g} keeps {achieved:,.0f} "
            f"{target.measure} ({achieved / original:.1%}; goal {goal / original:.1%})")
        if abs(achieved - goal) <= target.tolerance * goal:
            break
        if achieved > goal:
            lo = t
        else:
            hi = t
        t = _next_threshold(t, lo, hi, tried)
    chosen = min(range(len(iterations)), key=lambda i: abs(iterations[i].achieved - goal))
    best = iterations[chosen]
    reached = abs(best.achieved - goal) <= target.tolerance * goal
    message = "" if reached else (
        f"target {target.measure}={target.value:g} ({goal:,.0f}) not met within "
        f"{target.tolerance:.1%} after {len(iterations)} searches: closest reachable "
        f"{best.achieved:,.0f} ({best.fraction:.1%}) at threshold {best.threshold:.4g}")
    if message:
        log(message)
    if reset is not None:
        reset()
    return BudgetOutcome(asdict(target), goal, original, reached, chosen, iterations,
                         keeps[chosen], outcomes[chosen], message)
