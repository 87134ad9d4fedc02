"""Early decisions replayed on a recorded search: many batch orders for the price of one.

Whether an early decision agrees with the full pass depends on the batch order a trial
reads in (`EarlyDecisions.seed`). Checking that on real searches costs a search per order.
Here the exact search is run once while it records every state it measures on every
batch: each trial's candidate, and each block whole (the state E_prev's values come from
when computed as needed). `replay` then runs the library's own search and early decisions
(`search.greedy.adaptive_search`, `search.sequential`) on those values instead of forwards,
counting the image-block forwards each read would cost. For the batch order of a real run
it gives that run's decisions, reads and forwards exactly (tested);
other orders cost seconds. A replay that leaves the recorded path (an early decision the
full pass would not take) stops there and is reported as differing.

    RecordingDecisions   EarlyDecisions that never decide early and record every value
    Recording            what a recorded search measured, per state and batch
    replay               a search with early decisions, on a recording
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch

from ..search.greedy import adaptive_search
from ..search.sequential import EarlyDecisions, SequentialTrials
from ..utils.tensors import split_batch

WHOLE = None  # the size key of a block whole (its MLP unpruned, later blocks as decided)


@dataclass
class Recording:
    """Per state, the agreed value of every validation batch: (MLP, size) for a trial's
    candidate, (MLP, None) for the block whole; `start`: the block each MLP's trials run
    from (a read of one batch costs its images times the blocks from there to the end);
    `fill`: the forwards that filled the state cache; `sizes`: the recorded decisions."""

    values: dict[tuple[str, int | None], list[float]] = field(default_factory=dict)
    start: dict[str, int] = field(default_factory=dict)
    hidden: dict[str, int] = field(default_factory=dict)
    n_blocks: int = 0
    batch_images: list[int] = field(default_factory=list)
    fill: int = 0
    sizes: dict[str, int] = field(default_factory=dict)


class _Recorder(SequentialTrials):
    """Every trial reads every batch (its settings never decide early, so the search is
    the exact one); each candidate's values, and each block's whole, are kept."""

    def __init__(self, early: RecordingDecisions, evaluate: Any, state: Any, threshold: float):
        super().__init__(early, evaluate, state, threshold)
        self.recording = early.recording
        if evaluate.cache is None or not evaluate.block_of:
            raise ValueError("a recording needs the validation states cached")
        self.recording.start.update(evaluate.block_of)
        self.recording.n_blocks = evaluate.n_blocks

    def _values(self, name: str) -> list[float]:
        return [agreed for _, _, agreed in self.evaluate.batch_values(name, range(self.batches))]

    def full(self, name: str) -> float:
        value = super().full(name)
        self.recording.values[name, WHOLE] = list(self.state.reference)
        return value

    def trial(self, name: str, size: int, hidden: int | None = None,
              masked: Callable[[], AbstractContextManager] = nullcontext) -> float:
        if (name, WHOLE) not in self.recording.values:  # before the candidate is in place
            self.recording.values[name, WHOLE] = self._values(name)
        self.recording.hidden[name] = hidden
        value = super().trial(name, size, hidden, masked)
        read = self.reads[name, size]
        self.recording.values[name, size] = [read.agreed[b] for b in range(self.batches)]
        return value

    def record(self) -> dict:
        cache = self.evaluate.cache
        if cache.recomputed_blocks:
            raise ValueError("a recording needs the whole state cache (none recomputed)")
        self.recording.fill = cache.block_forwards
        self.recording.batch_images = [split_batch(b)[0].shape[0]
                                       for b in self.evaluate.val_batches]
        self.recording.sizes = dict(self.state.sizes)
        return super().record()


@dataclass(frozen=True)
class RecordingDecisions(EarlyDecisions):
    """Pass as `AMPPruner(..., confidence=RecordingDecisions())`: the exact search (every
    trial reads every batch, decided by the exact rule), recorded into `recording`."""

    confidence: float = 0.5
    min_batches: int = 2**62
    recording: Recording = field(default_factory=Recording, compare=False)

    def sequential(self, evaluate: Any, state: Any, threshold: float) -> SequentialTrials:
        return _Recorder(self, evaluate, state, threshold)


class Diverged(Exception):
    """The replay left the recorded path at this MLP."""


class _ReplayEval:
    """What `adaptive_search` and `SequentialTrials` ask of an `EntropyEval`, answered from
    a recording; forwards counted as the cached search would run them."""

    mode = "replay"
    measure = SimpleNamespace(name="entropy")
    random_access = True

    def __init__(self, recording: Recording):
        self.rec = recording
        self.val_batches = recording.batch_images
        self.block_forwards = 0
        self.current: dict[str, int] = {}

    def value(self, name: str, b: int) -> float:
        key = (name, self.current.get(name, WHOLE))
        if key not in self.rec.values:
            raise Diverged(name)
        return self.rec.values[key][b]

    def batch_values(self, name: str, order):
        for b in order:
            self.block_forwards += (self.rec.n_blocks - self.rec.start[name]) * (
                self.val_batches[b])
            value = self.value(name, b)
            yield b, value, value

    def mean(self, values) -> float:
        total = 0.0
        for b in range(len(self.val_batches)):
            total += values[b]
        return total / len(self.val_batches)

    def full(self) -> float:
        """E_val at the end by full passes: the first block whole, every other decided."""
        first = min(self.rec.start, key=self.rec.start.get)
        self.block_forwards += self.rec.n_blocks * sum(self.val_batches)
        return self.mean(dict(enumerate(self.rec.values[first, WHOLE])))

    def done(self, name: str) -> None:
        pass

    @property
    def image_block_forwards(self) -> int:
        return self.rec.fill + self.block_forwards

    @contextmanager
    def candidate(self, name: str, view: Any, keep: torch.Tensor):
        self.current[name] = len(keep)
        try:
            yield
        finally:
            del self.current[name]

    def commit(self, name: str, view: Any, keep: torch.Tensor | None) -> None:
        if (view.hidden if keep is None else len(keep)) != self.rec.sizes[name]:
            raise Diverged(name)


def replay(recording: Recording, early: EarlyDecisions, threshold: float,
           max_steps: int = 6) -> dict:
    """The search with `early` on `recording`'s values: {"identical": whether every block
    decided the recorded size, "diverged_at": the MLP where it left the recorded path (None),
    "image_block_forwards" and "early_decisions" (the search's record; None if diverged)}."""
    evaluate = _ReplayEval(recording)
    names = sorted(recording.start, key=recording.start.get)
    views = {n: SimpleNamespace(hidden=recording.hidden[n],
                                output=SimpleNamespace(weight=torch.empty(0)))
             for n in names}
    scores = {n: torch.zeros(recording.hidden[n]) for n in names}
    try:
        out = adaptive_search(views, scores, evaluate, evaluate.candidate, evaluate.commit,
                              threshold, max_steps, show_progress=False, early=early)
    except Diverged as e:
        return {"identical": False, "diverged_at": str(e), "image_block_forwards": None,
                "early_decisions": None}
    return {"identical": out.hidden_sizes == recording.sizes, "diverged_at": None,
            "image_block_forwards": evaluate.image_block_forwards,
            "early_decisions": out.early}
