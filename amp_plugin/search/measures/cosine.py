"""1 - the mean cosine between each image's candidate and original features."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ...core.criterion import gather_features
from . import register_measure
from .base import SearchMeasure


@register_measure
class Cosine(SearchMeasure):
    name = "cosine"
    needs = frozenset({"original"})
    description = "1 - mean cosine between the candidate's and the original's features"

    @classmethod
    def from_importance(cls, importance) -> Cosine:
        return cls()

    def reference(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(gather_features(features).float(), dim=-1)

    def __call__(self, features: torch.Tensor, extra: Any, reference: torch.Tensor
                 ) -> torch.Tensor:
        n = F.normalize(gather_features(features).float(), dim=-1)
        return 1 - (n * reference).sum(dim=-1).mean()
