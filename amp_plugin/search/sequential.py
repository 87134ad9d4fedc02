"""Early decisions in a trial of the greedy search (`amp.search.confidence`).

A trial accepts a size when the candidate's mean over the N validation batches is at most
E_prev + threshold. Per batch b, the candidate's value minus the value of the state E_prev
was measured on (the same batch) is a paired difference d_b; the comparison is
mean(d) <= threshold. The batches are read in a fixed random order, and after each batch
(from `min_batches` on) a confidence interval for the mean of all N differences is
checked: a pass stops as soon as the interval lies wholly on one side of the threshold.
A pass that the interval never decides reads every batch, and the exact comparison
decides as without the option.

E_prev's per-batch values: with `exact_reference` (the default) each block's accepted size
is read on every batch once its block is decided, so E_prev is the full pass's value and an
early accept the full pass refutes is searched again. Without it, a trial computes E_prev's
value on a batch only when it reads a batch not yet known (the block whole, from the same
cached states), and only the last block searched is completed (the search's final E_val):
no batch is read that no trial needs.

    half_width(diffs, N, alpha)    the interval's half-width for the mean of all N after n
    interval(diffs, N, alpha, m)   the interval at n, valid at every n >= m at once
    PairedTest                     accumulates the differences of one trial and decides
    EarlyDecisions                 the settings: confidence, error per trial, batch order
    SequentialTrials               the search's trials with early decisions (reads, decisions,
                                   completing an accepted size, a refuted block again)

The bound: with the N differences drawn from a normal law, the mean of all N minus the
mean of the n read is (1 - n/N) (mean of the N - n unread - mean of the n read), and
(mean(all) - mean(read)) / (s sqrt((1 - n/N) / n)) follows Student's t with n - 1 degrees
of freedom (s: the sample standard deviation of the n read; sqrt(1 - n/N) is the
finite-population correction, so the interval closes as n nears N). A trial looks at
most N - m times, so giving each look alpha / (N - m) (a union bound) makes the interval
hold at every look at once with probability >= 1 - alpha: a time-uniform bound.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=4096)
def t_quantile(p: float, dof: int) -> float:
    """Student's t quantile."""
    from scipy.stats import t

    return float(t.ppf(p, dof))


def half_width(diffs: Sequence[float], population: int, alpha: float) -> tuple[float, float]:
    """(mean of the n `diffs` read, half-width of the two-sided 1 - alpha interval for the
    mean of all `population` values), 2 <= n <= N."""
    n = len(diffs)
    if not 2 <= n <= population:
        raise ValueError(f"needs 2 <= n <= N, got n={n}, N={population}")
    mean = sum(diffs) / n
    s = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    return mean, t_quantile(1 - alpha / 2, n - 1) * s * math.sqrt((1 - n / population) / n)


def interval(diffs: Sequence[float], population: int, alpha: float, min_batches: int
             ) -> tuple[float, float]:
    """The interval for the mean of all `population` values after the n `diffs` read,
    holding at every look n = min_batches .. N - 1 at once with probability >= 1 - alpha."""
    mean, half = half_width(diffs, population, alpha / max(1, population - min_batches))
    return mean - half, mean + half


class PairedTest:
    """The differences of one trial, read one batch at a time; `decision()` is True
    (accept: the mean of all N is <= threshold), False (reject) or None (undecided)."""

    def __init__(self, population: int, threshold: float, alpha: float, min_batches: int):
        self.population, self.threshold = population, threshold
        self.alpha, self.min_batches = alpha, min_batches
        self.diffs: list[float] = []
        self.bounds: tuple[float, float] | None = None

    def add(self, diff: float) -> bool | None:
        self.diffs.append(diff)
        return self.decision()

    def decision(self) -> bool | None:
        n = len(self.diffs)
        if n < max(2, self.min_batches) or n >= self.population:
            return None  # too few to trust the spread; or all read: the exact rule decides
        lo, hi = self.bounds = interval(self.diffs, self.population, self.alpha,
                                        self.min_batches)
        if hi < self.threshold:
            return True
        if lo > self.threshold:
            return False
        return None


@dataclass(frozen=True)
class EarlyDecisions:
    """`confidence`: the probability that every early decision of a search is the one the
    full pass would take (split evenly over the trials a search can run, `trials`).
    `min_batches`: read before any early decision; `seed`: the batch order; `nearest`: pair
    each trial with the nearest size of its block already read on every batch (False: always
    with the block's start, E_prev's state); `exact_reference`: complete each block's
    accepted size on every batch (False: E_prev's values only on the batches trials read)."""

    confidence: float
    trials: int = 1
    min_batches: int = 4
    seed: int = 0
    nearest: bool = True
    exact_reference: bool = True

    def __post_init__(self):
        if not (isinstance(self.confidence, (int, float)) and 0 < self.confidence < 1):
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence!r}")
        if self.trials < 1 or self.min_batches < 2:
            raise ValueError("trials must be >= 1 and min_batches >= 2")

    @property
    def alpha(self) -> float:
        """The error allowed to one trial."""
        return (1.0 - self.confidence) / self.trials

    def order(self, batches: int) -> list[int]:
        """The fixed random order every trial reads the batches in."""
        order = list(range(batches))
        random.Random(self.seed).shuffle(order)
        return order

    def test(self, batches: int, threshold: float) -> PairedTest:
        return PairedTest(batches, threshold, self.alpha, self.min_batches)

    def sequential(self, evaluate: Any, state: Any, threshold: float) -> SequentialTrials:
        """The trials of one search under these settings."""
        return SequentialTrials(self, evaluate, state, threshold)


@dataclass
class TrialRead:
    """What one trial read: each batch's value on this rank and agreed over ranks (batch ->
    value), and the early decision (None: every batch was read; the exact comparison
    decides)."""

    values: dict[int, float]
    agreed: dict[int, float]
    decision: bool | None = None


def read_trial(values, reference: Sequence[float] | None, test: PairedTest | None
               ) -> TrialRead:
    """Read `values` ((batch, value on this rank, value agreed over ranks), in the trial's
    order) until `test` decides on the differences with `reference` (the agreed values of
    the same batches for the state the trial is paired with); no test: read them all."""
    read = TrialRead({}, {})
    for b, local, agreed in values:
        read.values[b], read.agreed[b] = local, agreed
        if test is not None:
            read.decision = test.add(agreed - reference[b])
            if read.decision is not None:
                break
    return read


def record(early: EarlyDecisions, batches: int, reads: Sequence[int],
           completions: dict[str, int], refuted: dict[str, int] | None = None,
           reference_reads: int = 0) -> dict:
    """What `PruneResult.extra["early_decisions"]` holds: the settings, the batches each
    trial read (in trace order; 0 for a size already measured in its block), the batches
    read to complete each block's accepted size, the batches E_prev's values were computed
    on as trials needed them (`exact_reference` off), the totals against full passes, and
    the blocks whose early accept the completed pass refuted (searched again, every batch
    read; the batches their first attempt read count in `batches_read`, not in `reads`)."""
    refuted = dict(refuted or {})
    trials = sum(1 for r in reads if r)
    read = sum(reads) + sum(completions.values()) + sum(refuted.values()) + reference_reads
    return {"confidence": early.confidence, "nearest": early.nearest,
            "exact_reference": early.exact_reference,
            "alpha_per_trial": early.alpha, "min_batches": early.min_batches,
            "batches": batches, "reads": list(reads),
            "completions": dict(completions), "reference_reads": reference_reads,
            "batches_read": read,
            "batches_full_passes": trials * batches,
            "decided_early": sum(1 for r in reads if 0 < r < batches),
            "refuted": refuted}


class SequentialTrials:
    """The trials of `search.greedy.adaptive_search` with early decisions: each reads the
    batches in the fixed random order until the paired test decides; `decided` ends a
    block (completes its accepted size, or carries its values over as E_prev's).

    `evaluate`: the search's `EntropyEval` (`batch_values`, `mean`, `random_access`,
    `val_batches`); `state`: its `SearchState`, whose `reference` (E_prev's agreed value on
    every batch), `reads`, `completions` and `refuted` this keeps."""

    def __init__(self, early: EarlyDecisions, evaluate: Any, state: Any, threshold: float):
        self.early, self.evaluate, self.state, self.threshold = early, evaluate, state, threshold
        self.batches = len(evaluate.val_batches)
        # a streamed loader without cached states is read in its own order
        self.order = (early.order(self.batches) if evaluate.random_access
                      else list(range(self.batches)))
        self.reads: dict[tuple[str, int], TrialRead] = {}
        self.full_passes = False
        self.block, self.first_read = None, 0  # the block of the last trial; its first read

    def full(self, name: str) -> float:
        """E_val of the model as it is now, every batch read: the next reference."""
        read = read_trial(self.evaluate.batch_values(name, range(self.batches)), None, None)
        self._next_reference(read)
        return self.evaluate.mean(read.values)

    @property
    def exact_reference(self) -> bool:
        return self.early.exact_reference

    def paired_with(self, name: str, size: int, hidden: int) -> tuple[list[float], float]:
        """(per-batch values to pair a trial of `size` with, the threshold on the mean
        difference). The block's start (E_prev's state, the MLP whole at `hidden`) pairs
        at `threshold`; with `early.nearest`, a trial of this block read on every batch at
        a size nearer `size` pairs instead, at `threshold` minus its own exact rise over
        E_prev: mean(e - e_near) <= threshold - (mean(e_near) - E_prev) is the same
        comparison, and two nearby sizes differ less from batch to batch, so the interval
        is narrower. The partner is chosen before the trial reads anything."""
        reference = self.state.reference
        if not self.early.nearest or None in reference:  # a partner's rise needs every batch
            return reference, self.threshold
        full = {s: r for (n, s), r in self.reads.items()
                if n == name and len(r.agreed) == self.batches}
        near = min(full, key=lambda s: (abs(s - size), -s), default=None)
        if near is None or abs(near - size) >= abs(hidden - size):
            return reference, self.threshold
        values = [full[near].agreed[b] for b in range(self.batches)]
        rise = sum(v - r for v, r in zip(values, reference, strict=True)) / self.batches
        return values, self.threshold - rise

    def _as_needed(self, name: str, masked: Callable[[], AbstractContextManager],
                   order: Sequence[int], stack: ExitStack):
        """The candidate's values batch by batch in `order`, E_prev's value on each batch
        computed first where not yet known (the MLP whole). `stack`, the caller's, holds
        the candidate in place from batch to batch: it is left only to compute E_prev's
        value, and when the caller's `with` ends (also where a reader stops early)."""
        reference, placed = self.state.reference, False
        for b in order:
            if reference[b] is None:
                if placed:
                    stack.close()
                    placed = False
                _, _, reference[b] = next(iter(self.evaluate.batch_values(name, [b])))
                self.state.reference_reads += 1
            if not placed:
                stack.enter_context(masked())
                placed = True
            yield next(iter(self.evaluate.batch_values(name, [b])))

    def _read(self, name: str, masked: Callable[[], AbstractContextManager],
              order: Sequence[int], reference: Sequence[float] | None,
              test: PairedTest | None) -> TrialRead:
        """`read_trial` of the candidate (`masked()` in place) over `order`, E_prev's values
        computed first where needed (`exact_reference` off)."""
        if self.exact_reference:
            with masked():
                return read_trial(self.evaluate.batch_values(name, order), reference, test)
        with ExitStack() as stack:
            return read_trial(self._as_needed(name, masked, order, stack), reference, test)

    def trial(self, name: str, size: int, hidden: int | None = None,
              masked: Callable[[], AbstractContextManager] = nullcontext) -> float:
        """The candidate's mean over the batches its trial read (exact when all);
        `hidden`: the MLP's width when whole (the size of the block's start state);
        `masked()`: the candidate in place (this enters it)."""
        if name != self.block:
            self.block, self.first_read = name, len(self.state.reads)
        if not self.exact_reference and self.state.reference is None:
            self.state.reference = [None] * self.batches  # resumed: computed as needed
        # resumed without E_prev's values on every batch: full passes until the next one
        test, reference = None, self.state.reference
        if reference is not None and not self.full_passes:
            reference, threshold = self.paired_with(name, size,
                                                    size + 1 if hidden is None else hidden)
            test = self.early.test(self.batches, threshold)
        read = self._read(name, masked, self.order, reference, test)
        self.reads[name, size] = read
        self.state.reads.append(len(read.values))
        if len(read.values) == self.batches:
            return self.evaluate.mean(read.values)
        return sum(read.values.values()) / len(read.values)

    def accepted(self, name: str, size: int, rise: float) -> bool:
        """The early decision, else the exact comparison: `rise` over the exact E_prev, or
        (E_prev's values computed as needed, so every batch's is known now) the mean of the
        per-batch differences."""
        read = self.reads[name, size]
        return self._holds(name, size, rise) if read.decision is None else read.decision

    def decided(self, name: str, best: int, accepted: bool, last: bool,
                masked: Callable[[int], AbstractContextManager],
                search: Callable[[], int]) -> tuple[int, float | None]:
        """Block `name`'s binary search chose `best` (`accepted`: a trial accepted it;
        `last`: the last block searched; `masked(size)`: that candidate in place; `search()`:
        the block's binary search again, its trace dropped). Returns (the block's size, the
        next E_prev: None where E_val is measured again, as after a block that accepted
        nothing in the plain search).

        An accepted size is completed (read on the batches its trial left) with
        `exact_reference`, and always in the last block (the search's final E_val); an early
        accept that exact pass refutes is searched again. Otherwise the block's values carry
        over: those the accepted size read, or E_prev's if nothing was accepted (the model
        is unchanged), the next E_prev being the mean over the batches read."""
        if accepted and (self.exact_reference or last):
            exact = self._complete(name, best, lambda: masked(best))
            if not self._holds(name, best, exact - self.state.e_prev):
                return self._again(name, search)
            self._next_reference(self.reads[name, best])
            return best, exact
        if not accepted:  # the model unchanged; E_prev and its values carry over as needed
            self.reads.clear()
            return best, None if self.exact_reference or last else self.state.e_prev
        read = self.reads[name, best]  # the rest of its values are computed as needed
        self._next_reference(read)
        return best, sum(read.values.values()) / len(read.values)

    def _next_reference(self, read: TrialRead) -> None:
        """`read`'s agreed values become E_prev's (None where not read); the block's reads
        are done with."""
        self.state.reference = [read.agreed.get(b) for b in range(self.batches)]
        self.reads.clear()

    def _holds(self, name: str, size: int, rise: float) -> bool:
        """The exact comparison of a size read on every batch."""
        if not self.exact_reference:
            read, ref = self.reads[name, size], self.state.reference
            rise = sum(read.agreed[b] - ref[b] for b in range(self.batches)) / self.batches
        return rise <= self.threshold

    def _complete(self, name: str, size: int,
                  masked: Callable[[], AbstractContextManager] = nullcontext) -> float:
        """The accepted `size` (`masked()`: its candidate in place) read on the batches its
        trial left; returns its exact mean."""
        read = self.reads[name, size]
        rest = [b for b in self.order if b not in read.values]
        more = self._read(name, masked, rest, None, None)
        read.values.update(more.values)
        read.agreed.update(more.agreed)
        self.state.completions[name] = len(rest)
        return self.evaluate.mean(read.values)

    def _again(self, name: str, search: Callable[[], int]) -> tuple[int, float | None]:
        """A block whose early accept the full pass refuted: `search()` (its binary search
        from scratch) with every trial reading every batch. Returns (size, its exact E_val;
        None if nothing was accepted). Recorded in `refuted` with the batches the refuted
        attempt read, its trials' reads dropped."""
        reads = self.state.reads
        self.state.refuted[name] = (sum(reads[self.first_read:])
                                    + self.state.completions.pop(name))
        del reads[self.first_read:]
        self.reads.clear()
        self.full_passes = True
        try:
            best = search()
        finally:
            self.full_passes = False
        read = self.reads.get((name, best))
        if read is None:  # nothing accepted: E_val is measured again
            self.reads.clear()
            return best, None
        self._next_reference(read)  # read on every batch
        return best, self.evaluate.mean(read.values)

    def record(self) -> dict:
        return record(self.early, self.batches, self.state.reads, self.state.completions,
                      self.state.refuted, self.state.reference_reads)
