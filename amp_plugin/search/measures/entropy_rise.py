"""The authors' rule: the validation batch entropy itself (docs/algorithm.md, section 1),
so that the greedy search accepts a size when the entropy rises by at most the
threshold."""

from __future__ import annotations

from typing import Any

import torch

from . import register_measure
from .base import SearchMeasure


@register_measure
class EntropyRise(SearchMeasure):
    name = "entropy_rise"
    needs = frozenset({"criterion"})
    description = "the batch entropy of the importance's criterion (the authors' rule)"

    def __init__(self, criterion):
        self.criterion = criterion

    @classmethod
    def from_importance(cls, importance) -> EntropyRise:
        return cls(importance.criterion)

    def __call__(self, features: torch.Tensor, extra: Any, reference: Any = None
                 ) -> torch.Tensor:
        return self.criterion(features, extra)
