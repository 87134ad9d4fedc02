"""The protocol every search measure follows.

A search measure turns the pooled features of one validation batch into one number; the
search averages it over the validation batches. A measure that compares with the
original model declares it (`needs` holds "original"): the evaluator then runs the
original model once per validation batch, before any neuron is removed, and keeps what
`reference` returns for that batch.

    needs        what the measure reads besides the candidate's features:
                 "criterion"  the importance's criterion and each batch's extra (text, labels)
                 "original"   the original model's features of the same batch
    reference    what is kept of the original's features for one batch (small: rows of a
                 similarity matrix, normalised features)
    __call__     the value for one batch, a 0-dim float32 tensor

Lower is better for every measure, and the original model scores its own `base` (0 for
a measure against the original): a size's distortion is its value minus the base.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

NEEDS = frozenset({"criterion", "original"})


class SearchMeasure:
    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    description: ClassVar[str] = ""

    @classmethod
    def from_importance(cls, importance) -> SearchMeasure:
        """The measure for a search scored by `importance` (its criterion, 1/T)."""
        raise NotImplementedError

    def reference(self, features: torch.Tensor) -> Any:
        """What is kept of the original model's features of one batch."""
        return None

    def __call__(self, features: torch.Tensor, extra: Any, reference: Any) -> torch.Tensor:
        raise NotImplementedError
