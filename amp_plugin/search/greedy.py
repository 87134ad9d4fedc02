"""The adaptive search of docs/algorithm.md section 3, written once.

    adaptive_search(...)   last MLP first: binary search of each MLP's kept size on the
                           validation entropy; how a candidate is applied and how a size
                           is committed are parameters (AMPPruner prunes through the
                           dependency graph, the NNI pruner writes masks)
    EntropyEval            E_val over fixed validation batches, with the states entering
                           every searched block cached once (`StateCache`, full or
                           checkpointed), so a trial runs only blocks l..L-1; ranks
                           agree on every value
    SearchState            what is decided so far: a killed search resumes from it

With default options the sizes are exactly those of the reference procedure. A size
already measured in the same block is not measured again.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from itertools import islice

import torch
from torch import nn

from ..core.adapter import vision_tower
from ..core.batches import SameShape, batch_images
from ..core.convergence import keep_order
from ..core.importance import AMPImportance
from ..core.mlp import MLPView, find_mlps
from ..utils.dist import agree, global_batch_size
from ..utils.finite import NonFiniteError
from ..utils.progress import Bar
from ..utils.tensors import device_of, split_batch, to_device
from .cache import StateCache
from .measures import DEFAULT_MEASURE, SearchMeasure, make_measure
from .sequential import EarlyDecisions


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
    kept_whole: dict[str, str] = field(default_factory=dict)  # MLPs not searched, and why

    def to_dict(self) -> dict:
        return asdict(self)


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


def mlp_positions(tower: nn.Module, adapter, views: Mapping[str, MLPView]
                  ) -> dict[str, int] | None:
    """Where each MLP runs: the index of its block, len(blocks) for an MLP of the pooling
    head (it runs on the state after the last block), or None for the whole mapping if
    some MLP is neither inside exactly one block nor in the head."""
    blocks = adapter.blocks(tower)
    out = {}
    for name, view in views.items():
        hits = [i for i, blk in enumerate(blocks) if any(m is view.module for m in blk.modules())]
        if len(hits) == 1:
            out[name] = hits[0]
        elif not hits and adapter.in_head(tower, view.module):
            out[name] = len(blocks)
        else:
            return None
    return out


def head_mlps(model: nn.Module) -> list[str]:
    """Tower-relative names of the MLPs in the model's pooling head (e.g. the MLP of a
    MAP attention pool in SigLIP / PE-Core): not block MLPs, kept whole by default."""
    tower, adapter = vision_tower(model)
    return [n for n, v in find_mlps(tower).items() if adapter.in_head(tower, v.module)]


class EntropyEval:
    """E_val(model) of docs/algorithm.md section 3 for a search over the MLPs `views` of
    `model`, or the mean of another search measure (`search.measures`) over the validation
    batches.

    The blocks before the one searched never change while it is searched, so the states
    entering each searched block are computed once and a trial runs only the blocks from
    there on (none for an MLP of the pooling head: its trials run the head alone). With a
    custom `feature_fn`, or an MLP elsewhere, every trial is a full forward pass instead.
    A measure against the original model gets the original's reference for every batch,
    computed here once (the model must be the original when this is built).
    `block_forwards` counts the image-block forwards run (a full pass of an image: L).
    """

    def __init__(self, model: nn.Module, importance: AMPImportance, val_batches: Iterable,
                 views: Mapping[str, MLPView], cache: StateCache | None = None,
                 show_progress: bool = True, feature_fn: Callable | None = None,
                 measure: str | SearchMeasure = DEFAULT_MEASURE):
        self.model, self.importance = model, importance
        self.feature_fn = feature_fn or importance.feature_fn
        self.criterion = importance.criterion
        self.measure = make_measure(measure, importance)
        # a list, or a re-iterable loader streaming the batches (only `full()` re-reads it)
        self.val_batches = val_batches
        if not len(val_batches):
            raise ValueError("val_batches is empty")
        self.tower, self.adapter = vision_tower(model)
        self.n_blocks = len(self.adapter.blocks(self.tower))
        self.block_of = None
        if self.feature_fn is None:
            self.block_of = mlp_positions(self.tower, self.adapter, views)
        self.cache = None
        self.mode = "none (full forward per trial)"
        self.extras: list = []  # what the criterion needs besides images, per batch (small)
        self.block_forwards = 0
        self._batch_images: list[int] = []
        if self.block_of:  # None: full passes; empty: nothing left to search
            self.cache = cache or StateCache()

            def images():
                same = SameShape("val_batches")
                for b, batch in enumerate(val_batches):
                    x, extra = batch_images(batch, b, "val_batches")
                    same(x, b)
                    self.extras.append(extra)
                    self._batch_images.append(x.shape[0])
                    yield x
            self.mode = self.cache.fill(self.tower, self.adapter, images(), len(val_batches),
                                        starts=sorted(set(self.block_of.values())),
                                        show_progress=show_progress)
        self._pending = dict(self.block_of or {})
        self.keep_states = False  # budget mode searches several times over the same states
        self.references: list | None = None
        self.original_entropy: float | None = None
        if "original" in self.measure.needs:
            self.references = self._original_references()

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes if self.cache is not None else 0

    @property
    def image_block_forwards(self) -> int:
        """Image-block forwards so far: the cache's (filling, recomputing) and the trials'."""
        return self.block_forwards + (self.cache.block_forwards if self.cache else 0)

    def _features(self, state, extra) -> torch.Tensor:
        feats = self.adapter.head(self.tower, state)
        return self.adapter.project(self.tower, feats) if self.importance.projects(
            extra) else feats

    @property
    def random_access(self) -> bool:
        """Whether a trial can read the batches in any order (cached states, or a list)."""
        return bool(self.block_of) or isinstance(self.val_batches, (list, tuple))

    def _chosen(self, count: int | None, order: Sequence[int] | None):
        """(index, batch) of the first `count` batches, or of the batches `order` (in
        increasing order where the batches are streamed)."""
        if order is None:
            return enumerate(islice(self.val_batches, count))
        if isinstance(self.val_batches, (list, tuple)):
            return ((b, self.val_batches[b]) for b in order)
        wanted = list(order)
        if wanted != sorted(wanted):
            raise ValueError("streamed validation batches are read in their own order")
        last, keep = max(wanted, default=-1), set(wanted)
        return ((b, batch) for b, batch in enumerate(islice(self.val_batches, last + 1))
                if b in keep)

    def _batch_features(self, start: int | None, count: int | None,
                        order: Sequence[int] | None = None):
        """(features, extra) of the first `count` validation batches (all: None), or of the
        batches `order` (indices), with the model as it is now: from the states entering
        block `start`, or by full passes."""
        device = device_of(self.model)
        if start is None:
            same = SameShape("val_batches")
            for b, batch in self._chosen(count, order):
                images, extra = batch_images(batch, b, "val_batches")
                same(images, b)
                images = images.to(device)
                feats = (self.feature_fn(self.model, images) if self.feature_fn is not None
                         else self.importance.features(self.model, images, extra))
                self.block_forwards += self.n_blocks * images.shape[0]
                yield feats, to_device(extra, device)
            return
        for b in range(len(self.extras[:count])) if order is None else order:
            extra = self.extras[b]
            state = self.cache.get(start, b)
            for i in range(start, self.n_blocks):
                state = self.adapter.run_block(self.tower, i, state)
            self.block_forwards += (self.n_blocks - start) * state[0].shape[0]
            yield self._features(state, extra), to_device(extra, device)

    @torch.no_grad()
    def _original_references(self) -> list:
        """The measure's reference of every batch, and E_val, of the model as it is now."""
        start = max(self.block_of.values()) if self.block_of else None
        refs, ent = [], 0.0
        for feats, extra in self._batch_features(start, None):
            refs.append(self.measure.reference(feats))
            ent += float(self.criterion(feats, extra))
        self.original_entropy = agree(ent / len(refs))
        return refs

    def batches_for(self, images: int | None) -> int | None:
        """How many of the first validation batches hold `images` images (rounded down,
        at least one; counted over all ranks); None: all of them."""
        if images is None:
            return None
        if not self._batch_images:  # full passes: read the batch sizes off the data
            self._batch_images = [split_batch(b)[0].shape[0] for b in self.val_batches]
        per_batch = global_batch_size(self._batch_images[0])
        return max(1, min(len(self._batch_images), images // per_batch))

    def _start(self, name: str) -> int | None:
        if self.block_of is None or name not in self._pending:
            return None
        return self.block_of[name]

    @torch.no_grad()
    def values(self, name: str, batches: int | None = None, entropy: bool = False
               ) -> tuple[float, float | None]:
        """(the measure, and the criterion's entropy when asked) with the model as it is
        now, for a trial of MLP `name`, over the first `batches` validation batches (all:
        None); one forward per batch serves both."""
        count = len(self.val_batches) if batches is None else min(batches,
                                                                  len(self.val_batches))
        total, ent = 0.0, 0.0
        for b, (feats, extra) in enumerate(self._batch_features(self._start(name), count)):
            ref = self.references[b] if self.references is not None else None
            total += float(self.measure(feats, extra, ref))
            if entropy:
                ent += float(self.criterion(feats, extra))
        return agree(total / count), (agree(ent / count) if entropy else None)

    @torch.no_grad()
    def batch_values(self, name: str, order: Sequence[int]):
        """(batch, the measure on this rank, agreed over ranks) of each validation batch in
        `order` with the model as it is now, for a trial of MLP `name`, one batch at a time
        (a caller that stops reading runs no more batches)."""
        for b, (feats, extra) in zip(order, self._batch_features(self._start(name), None,
                                                                 order), strict=False):
            ref = self.references[b] if self.references is not None else None
            value = float(self.measure(feats, extra, ref))
            yield b, value, agree(value)

    def mean(self, values: Mapping[int, float]) -> float:
        """The mean over all batches of per-batch values, summed in batch order as
        `values()` sums them (so bit for bit its result)."""
        total = 0.0
        for b in range(len(self.val_batches)):
            total += values[b]
        return agree(total / len(self.val_batches))

    def __call__(self, name: str, batches: int | None = None) -> float:
        """The measure (E_val by default) with the model as it is now, for a trial of MLP
        `name`, over the first `batches` validation batches (all: None)."""
        return self.values(name, batches)[0]

    def full(self) -> float:
        """The measure by full forward passes."""
        return self.values("", None)[0]

    def done(self, name: str) -> None:
        """MLP `name` is decided: free the states of its block once no MLP needs them."""
        start = self._pending.pop(name, None)
        if (start is not None and self.cache is not None and not self.keep_states
                and start not in self._pending.values()):
            self.cache.drop(start)

    def release(self, name: str) -> None:
        """Trials of MLP `name` are over for now: free its block's states where they can be
        computed again from a checkpoint (kept otherwise: they may be needed again)."""
        start = (self.block_of or {}).get(name)
        if start is not None and self.cache is not None and self.cache.recomputable(start):
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
    early: dict | None = None  # early decisions' record (`sequential.record`)


@dataclass
class SearchState:
    """Where a search stands after a decided block: enough to resume it exactly (the
    decided sizes are re-applied to a fresh original, then the next block is searched)."""

    sizes: dict[str, int] = field(default_factory=dict)  # decided so far, in search order
    trace: list[Trial] = field(default_factory=list)
    e_prev: float | None = None
    e_start: float | None = None
    evaluations: int = 0
    # early decisions only: E_prev's value on every batch (None: not computed yet, with
    # exact_reference off), batches each trial read, batches read to complete each block's
    # accepted size, and batches E_prev's values were computed on as trials needed them
    reference: list[float | None] | None = None
    reads: list[int] = field(default_factory=list)
    completions: dict[str, int] = field(default_factory=dict)
    refuted: dict[str, int] = field(default_factory=dict)  # blocks searched again: batches
    reference_reads: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> SearchState:
        return cls(dict(d["sizes"]), [Trial(**t) for t in d["trace"]], d["e_prev"],
                   d["e_start"], int(d["evaluations"]), d.get("reference"),
                   list(d.get("reads", [])), dict(d.get("completions", {})),
                   dict(d.get("refuted", {})), int(d.get("reference_reads", 0)))


Candidate = Callable[[str, MLPView, torch.Tensor], AbstractContextManager]
Commit = Callable[[str, MLPView, torch.Tensor | None], None]


def measure_label(measure: str) -> str:
    return "validation entropy" if measure == DEFAULT_MEASURE else f"search measure {measure}"


def finite_value(value: float, name: str, size: int, what: str = "validation entropy",
                 where: str | None = None) -> float:
    """`value`, or NonFiniteError naming the measure and the candidate (`where`, else MLP
    `name` at `size` neurons)."""
    if not math.isfinite(value):
        raise NonFiniteError(f"prune: the {what} is {value} with "
                             f"{where or f'MLP {name} at {size} neurons'}")
    return value


def kept_neurons(scores: torch.Tensor, size: int) -> torch.Tensor | None:
    """The neurons a decided size keeps (sorted), None when the MLP stays whole."""
    return torch.sort(keep_order(scores)[:size]).values if size < len(scores) else None


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
    resume: SearchState | None = None,
    on_decided: Callable[[SearchState], None] | None = None,
    early: EarlyDecisions | None = None,
) -> SearchOutcome:
    """Search the MLPs `views` (forward order) from the last to the first.

    `candidate(name, view, keep)` is a context manager under which only neurons `keep` of
    that MLP act; `commit(name, view, keep)` makes the decision final (`keep` None: the
    MLP stays whole). `evaluate(name)` measures E_val for a trial of MLP `name`.
    `resume`: the state after the blocks already decided (their sizes already applied);
    `on_decided(state)` is called after each decided block. `early`: a trial stops reading
    batches once a sequential bound decides it (`search.sequential`); None: full passes.
    """
    index_of = index_of or {n: i for i, n in enumerate(views)}
    state = resume or SearchState()
    trace = state.trace
    names = [n for n in list(views)[::-1] if n not in state.sizes]
    cache = f"cache: {evaluate.mode.split(' (')[0]}"
    what = measure_label(evaluate.measure.name)
    sequential = early.sequential(evaluate, state, threshold) if early is not None else None
    with Bar(description, len(views), show_progress, status=cache) as bar:
        bar.advance(len(views) - len(names))
        for name in names:
            view = views[name]
            if state.e_prev is None:
                state.e_prev = finite_value(
                    evaluate(name) if sequential is None else sequential.full(name),
                    name, view.hidden, what)
                state.evaluations += 1
                state.e_start = state.e_prev if state.e_start is None else state.e_start
            order = keep_order(scores[name]).to(view.output.weight.device)
            measured: dict[int, float] = {}
            reference = state.e_prev
            step, first = [0], len(trace)

            def accept(size: int, name=name, view=view, order=order, measured=measured,
                       reference=reference, step=step) -> bool:
                step[0] += 1
                bar.note(f"{name}: step {step[0]}/{max_steps}, size {size}/{view.hidden}; "
                         f"{cache}")
                if size not in measured:
                    if sequential is None:
                        with candidate(name, view, order[:size]):
                            value = evaluate(name)
                    else:
                        value = sequential.trial(name, size, view.hidden, lambda: candidate(
                            name, view, order[:size]))
                    measured[size] = finite_value(value, name, size, what)
                    state.evaluations += 1
                elif sequential is not None:
                    state.reads.append(0)
                ok = (measured[size] - reference <= threshold if sequential is None
                      else sequential.accepted(name, size, measured[size] - reference))
                trace.append(Trial(name, index_of[name], size, measured[size], ok, reference))
                return ok

            def search(step=step, measured=measured, accept=accept, view=view, first=first
                       ) -> int:
                """The block's binary search, from scratch (its trials so far dropped)."""
                del trace[first:]
                measured.clear()
                step[0] = 0
                return candidate_sizes(view.hidden, max_steps, accept, round_to)

            best = search()
            hits = [t for t in trace[first:] if t.accepted and t.size == best]
            e_prev = hits[-1].entropy if hits else None
            if sequential is not None:
                best, e_prev = sequential.decided(
                    name, best, bool(hits), name == names[-1],
                    lambda size, name=name, view=view, order=order: candidate(
                        name, view, order[:size]), search)
                for t in trace[first:]:  # a completed size's mean is now the exact one
                    if t.accepted and t.size == best:
                        t.entropy = e_prev
            state.e_prev = e_prev
            commit(name, view, kept_neurons(scores[name], best))
            state.sizes[name] = best
            evaluate.done(name)
            bar.advance()
            if on_decided is not None:
                on_decided(state)
    # the states entering the last searched block are freed by now: a full forward
    e_end = state.e_prev if state.e_prev is not None else evaluate.full()
    return SearchOutcome({n: state.sizes[n] for n in views}, trace,
                         dict(before=float(state.e_start), after=float(e_end)),
                         state.evaluations, sequential and sequential.record())


HEAD_KEPT = "pooling-head MLP, kept whole (search_head=True searches it)"
NOT_SELECTED = "not selected"


def tower_mlps(model: nn.Module, names: Sequence[str] | None = None,
               search_head: bool = False) -> dict[str, MLPView]:
    """The MLPs of `model`'s vision tower (tower-relative names) that a search covers:
    `names`, or every block MLP plus, with `search_head`, the pooling head's MLP."""
    tower, _ = vision_tower(model)
    views = find_mlps(tower)
    if names is None:
        head = set() if search_head else set(head_mlps(model))
        return {n: v for n, v in views.items() if n not in head}
    unknown = [n for n in names if n not in views]
    if unknown:
        raise ValueError(f"no MLP named {unknown[0]!r} in the vision tower; MLPs: "
                         f"{', '.join(list(views)[:4])}...")
    return {n: v for n, v in views.items() if n in set(names)}
