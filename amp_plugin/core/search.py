"""The adaptive search of ALGORITHM.md section 3, written once.

    adaptive_search(...)   last MLP first: binary search of each MLP's kept size on the
                           validation entropy; how a candidate is applied and how a size
                           is committed are parameters (AMPPruner prunes through the
                           dependency graph, the NNI pruner writes masks)
    EntropyEval            E_val over fixed validation batches, with the states entering
                           every searched block cached once (`StateCache`), so a trial
                           runs only blocks l..L-1; ranks agree on every value

With default options the sizes are exactly those of the reference procedure. A size
already measured in the same block is not measured again.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..utils.dist import agree
from ..utils.progress import progress
from ..utils.tensors import device_of, split_batch, to_device
from .adapter import vision_tower
from .cache import StateCache
from .importance import AMPImportance
from .mlp import MLPView, find_mlps


@dataclass
class Trial:
    block: str
    index: int  # position of the MLP among all MLPs of the tower, in forward order
    size: int
    entropy: float
    accepted: bool
    reference: float  # E_prev the trial was compared with


@dataclass
class PruneResult:
    """What a search decided, for AMPPruner and the NNI pruner alike."""

    hidden_sizes: dict[str, int]
    original_sizes: dict[str, int]
    trace: list[Trial]
    params: dict[str, int] | None
    mlp_params: dict[str, int]
    flops: dict[str, int] | None
    entropy: dict[str, float]
    threshold: float
    max_steps: int
    round_to: int | None
    evaluations: int
    cache: str
    seconds: float
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def keep_order(scores: torch.Tensor) -> torch.Tensor:
    """Neuron indices by descending score (stable, so ties keep index order)."""
    return torch.sort(scores, descending=True, stable=True).indices


def candidate_sizes(hidden: int, max_steps: int, accept: Callable[[int], bool],
                    round_to: int | None = None) -> int:
    """Binary search of section 3 on `accept(size)`; returns the kept size.

    Sizes are multiples of `round_to` (capped at `hidden`); size 0 is never tried.
    """
    unit = round_to or 1
    lo, hi, best = 0, math.ceil(hidden / unit), hidden
    for _ in range(max_steps):
        mid = (lo + hi) // 2
        if mid == 0:
            break
        size = min(mid * unit, hidden)
        if accept(size):
            hi, best = mid, size
        else:
            lo = mid
    return best


def check_search_args(threshold: float, max_steps: int, round_to: int | None) -> None:
    if threshold is None or threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if round_to is not None and round_to < 1:
        raise ValueError(f"round_to must be a positive integer, got {round_to}")


def _block_index(blocks: Sequence[nn.Module], views: Mapping[str, MLPView]
                 ) -> dict[str, int] | None:
    """Block index of each MLP, or None if some MLP is not inside exactly one block."""
    out = {}
    for name, view in views.items():
        hits = [i for i, blk in enumerate(blocks) if any(m is view.module for m in blk.modules())]
        if len(hits) != 1:
            return None
        out[name] = hits[0]
    return out


class EntropyEval:
    """E_val(model) of ALGORITHM.md 3 for a search over the MLPs `views` of `model`.

    The blocks before the one searched never change while it is searched, so the states
    entering each searched block are computed once and a trial runs only the blocks from
    there on. With a custom `feature_fn`, or an MLP outside the blocks, every trial is a
    full forward pass instead.
    """

    def __init__(self, model: nn.Module, importance: AMPImportance, val_batches: Sequence,
                 views: Mapping[str, MLPView], cache: StateCache | None = None,
                 show_progress: bool = True, feature_fn: Callable | None = None):
        self.model, self.importance = model, importance
        self.feature_fn = feature_fn or importance.feature_fn
        self.criterion = importance.criterion
        self.val_batches = [split_batch(b) for b in val_batches]
        if not self.val_batches:
            raise ValueError("val_batches is empty")
        self.tower, self.adapter = vision_tower(model)
        self.block_of = None
        if self.feature_fn is None:
            self.block_of = _block_index(self.adapter.blocks(self.tower), views)
        self.cache = None
        self.mode = "none (full forward per trial)"
        if self.block_of is not None:
            self.cache = cache or StateCache()
            self.mode = self.cache.fill(self.tower, self.adapter,
                                        [im for im, _ in self.val_batches],
                                        starts=sorted(set(self.block_of.values())),
                                        show_progress=show_progress)
        self._pending = dict(self.block_of or {})
        self.keep_states = False  # budget mode searches several times over the same states

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes if self.cache is not None else 0

    def _features(self, state, extra) -> torch.Tensor:
        feats = self.adapter.head(self.tower, state)
        return self.adapter.project(self.tower, feats) if self.importance.projects(
            extra) else feats

    @torch.no_grad()
    def __call__(self, name: str) -> float:
        """E_val with the model as it is now, for a trial of MLP `name`."""
        if self.block_of is None or name not in self._pending:
            return self.full()
        start, device = self.block_of[name], device_of(self.model)
        n_blocks, total = len(self.adapter.blocks(self.tower)), 0.0
        for b, (_, extra) in enumerate(self.val_batches):
            state = self.cache.get(start, b)
            for i in range(start, n_blocks):
                state = self.adapter.run_block(self.tower, i, state)
            total += float(self.criterion(self._features(state, extra), to_device(extra, device)))
        return agree(total / len(self.val_batches))

    @torch.no_grad()
    def full(self) -> float:
        """E_val by full forward passes."""
        device, total = device_of(self.model), 0.0
        for images, extra in self.val_batches:
            images = images.to(device)
            feats = (self.feature_fn(self.model, images) if self.feature_fn is not None
                     else self.importance.features(self.model, images, extra))
            total += float(self.criterion(feats, to_device(extra, device)))
        return agree(total / len(self.val_batches))

    def done(self, name: str) -> None:
        """MLP `name` is decided: free the states of its block once no MLP needs them."""
        start = self._pending.pop(name, None)
        if (start is not None and self.cache is not None and not self.keep_states
                and start not in self._pending.values()):
            self.cache.drop(start)

    def rewind(self) -> None:
        """Before another search over the same states (needs `keep_states`)."""
        if not self.keep_states:
            raise RuntimeError("rewind() needs keep_states = True before the first search")
        self._pending = dict(self.block_of or {})

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()


@dataclass
class SearchOutcome:
    hidden_sizes: dict[str, int]
    trace: list[Trial]
    entropy: dict[str, float]
    evaluations: int


Candidate = Callable[[str, MLPView, torch.Tensor], AbstractContextManager]
Commit = Callable[[str, MLPView, torch.Tensor | None], None]


def adaptive_search(
    views: Mapping[str, MLPView],
    scores: Mapping[str, torch.Tensor],
    evaluate: EntropyEval,
    candidate: Candidate,
    commit: Commit,
    threshold: float,
    max_steps: int = 6,
    round_to: int | None = None,
    index_of: Mapping[str, int] | None = None,
    show_progress: bool = True,
    description: str = "AMP search",
) -> SearchOutcome:
    """Search the MLPs `views` (forward order) from the last to the first.

    `candidate(name, view, keep)` is a context manager under which only neurons `keep` of
    that MLP act; `commit(name, view, keep)` makes the decision final (`keep` None: the
    MLP stays whole). `evaluate(name)` measures E_val for a trial of MLP `name`.
    """
    index_of = index_of or {n: i for i, n in enumerate(views)}
    trace: list[Trial] = []
    evaluations = 0
    e_prev: float | None = None
    e_start: float | None = None
    sizes: dict[str, int] = {}
    names = list(views)[::-1]
    for step in progress(range(len(names)), description, enabled=show_progress):
        name = names[step]
        view = views[name]
        if e_prev is None:
            e_prev = evaluate(name)
            evaluations += 1
            e_start = e_prev if e_start is None else e_start
        order = keep_order(scores[name]).to(view.output.weight.device)
        measured: dict[int, float] = {}
        reference = e_prev

        def accept(size: int, name=name, view=view, order=order, measured=measured,
                   reference=reference) -> bool:
            nonlocal evaluations
            if size not in measured:
                with candidate(name, view, order[:size]):
                    measured[size] = evaluate(name)
                evaluations += 1
            ok = measured[size] - reference <= threshold
            trace.append(Trial(name, index_of[name], size, measured[size], ok, reference))
            return ok

        best = candidate_sizes(view.hidden, max_steps, accept, round_to)
        hits = [t for t in trace if t.block == name and t.accepted and t.size == best]
        e_prev = hits[-1].entropy if hits else None
        commit(name, view, torch.sort(order[:best]).values if best < view.hidden else None)
        sizes[name] = best
        evaluate.done(name)
    # the states entering the last searched block are freed by now: a full forward
    e_end = e_prev if e_prev is not None else evaluate.full()
    return SearchOutcome({n: sizes[n] for n in views}, trace,
                         dict(before=float(e_start), after=float(e_end)), evaluations)


def tower_mlps(model: nn.Module, names: Sequence[str] | None = None) -> dict[str, MLPView]:
    """The MLPs of `model`'s vision tower (tower-relative names), all or `names`."""
    tower, _ = vision_tower(model)
    views = find_mlps(tower)
    if names is None:
        return dict(views)
    unknown = [n for n in names if n not in views]
    if unknown:
        raise ValueError(f"no MLP named {unknown[0]!r} in the vision tower; MLPs: "
                         f"{', '.join(list(views)[:4])}...")
    return {n: v for n, v in views.items() if n in set(names)}
