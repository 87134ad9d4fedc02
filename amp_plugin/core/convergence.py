"""Scoring that knows when it has converged (`amp.score_convergence`, default off).

The greedy search only ever asks one thing of the scores: which neurons the top `size`
are, for the sizes its binary search can try (at most 2^max_steps - 1 of them per MLP). So
the scores are summarised by each neuron's *bucket*: how many of those sizes leave it out.
Two score vectors with the same buckets make the search try the same candidates, so the
search decides the same sizes from either. Every `every` calibration batches the buckets
of the running sums are compared with the last check's; the pass stops once they have not
changed (or, with `tolerance`, changed for at most that fraction of all neurons) for
`patience` checks in a row. That the remaining batches would not change them either is an
assumption (measured by `amp bench scoring`), not a guarantee: the option is off by
default and the stopping point is recorded.

    search_sizes(hidden, max_steps, round_to)   every size the binary search can try
    buckets(scores, sizes)                      per neuron: the sizes that leave it out
    ScoreConvergence                            the settings, and the checks of one pass
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def keep_order(scores: torch.Tensor) -> torch.Tensor:
    """Neuron indices by descending score (stable, so ties keep index order)."""
    return torch.sort(scores, descending=True, stable=True).indices


def search_sizes(hidden: int, max_steps: int = 6, round_to: int | None = None) -> list[int]:
    """Every size the binary search of `max_steps` steps can try on an MLP of `hidden`
    neurons (multiples of `round_to`, capped at `hidden`), ascending."""
    unit = round_to or 1
    sizes: set[int] = set()

    def walk(lo: int, hi: int, depth: int) -> None:
        mid = (lo + hi) // 2
        if depth == max_steps or mid == 0:
            return
        sizes.add(min(mid * unit, hidden))
        walk(lo, mid, depth + 1)
        walk(mid, hi, depth + 1)

    walk(0, math.ceil(hidden / unit), 0)
    return sorted(sizes)


def buckets(scores: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """For each neuron, how many of `sizes` leave it out (int16): a neuron of rank r (0:
    highest score) is kept at size s when r < s."""
    rank = torch.empty(len(scores), dtype=torch.int64)
    rank[keep_order(scores.cpu())] = torch.arange(len(scores))
    edges = torch.tensor(sizes, dtype=torch.int64)
    return torch.searchsorted(edges, rank, right=True).to(torch.int16)


@dataclass
class ScoreConvergence:
    """Stop scoring when the buckets of every MLP have been the same (at most a fraction
    `tolerance` of all neurons moved) for `patience` checks in a row, one check every
    `every` batches. `max_steps` and `round_to` are the search's (they decide the sizes it
    can try). `history` holds (batch, neurons whose bucket moved
    since the last check) per check; `stable` the checks in a row without a move;
    `stopped` the batch the pass stopped after (None: it read every batch)."""

    every: int = 50
    patience: int = 3
    tolerance: float = 0.0
    max_steps: int = 6
    round_to: int | None = None
    last: dict[str, torch.Tensor] | None = None
    stable: int = 0
    history: list[tuple[int, int]] = field(default_factory=list)
    stopped: int | None = None

    def __post_init__(self):
        for key in ("every", "patience", "max_steps"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"score convergence: {key} must be a whole number >= 1, "
                                 f"got {value!r}")
        if not (isinstance(self.tolerance, (int, float)) and 0 <= self.tolerance < 1):
            raise ValueError(f"score convergence: tolerance must be in [0, 1), got "
                             f"{self.tolerance!r}")

    def due(self, batches: int) -> bool:
        return batches % self.every == 0

    def check(self, batches: int, sums: dict[str, torch.Tensor]) -> bool:
        """Record the check after `batches` batches of the running `sums` (the same on
        every rank); True when the pass should stop here."""
        now = {n: buckets(s, search_sizes(len(s), self.max_steps, self.round_to))
               for n, s in sums.items()}
        moved = (sum(len(s) for s in now.values()) if self.last is None else
                 sum(int((now[n] != self.last[n]).sum()) for n in now))
        quiet = moved <= self.tolerance * sum(len(s) for s in now.values())
        self.stable = self.stable + 1 if self.last is not None and quiet else 0
        self.last = now
        self.history.append((batches, moved))
        if self.stable >= self.patience:
            self.stopped = batches
        return self.stopped is not None

    def record(self, read: int) -> dict:
        """What the score stage's metadata keeps: settings, where it stopped, the checks."""
        return {"every": self.every, "patience": self.patience, "tolerance": self.tolerance,
                "batches_read": read,
                "stopped": self.stopped, "history": [list(h) for h in self.history]}

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON-able values) that `restore` takes back: saved with a checkpoint
        of the score stage, so a resumed pass stops where an uninterrupted one would."""
        tensors = {} if self.last is None else dict(self.last)
        return tensors, {"stable": self.stable, "history": [list(h) for h in self.history],
                         "checked": self.last is not None}

    def restore(self, tensors: dict[str, torch.Tensor], values: dict) -> None:
        self.last = dict(tensors) if values.get("checked") else None
        self.stable = int(values.get("stable", 0))
        self.history = [(int(b), int(m)) for b, m in values.get("history", [])]
        self.stopped = None
