"""KL(original || candidate) between the batch-similarity distributions: for each image i
of a batch, p_i = softmax_k(1/T <n_i, n_k>) of the original model's normalised features
and q_i the candidate's (the rows the entropy criterion is computed from), averaged over
the rows. It is 0 for the original model and grows as the candidate's view of which
images are alike departs from the original's."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ...core.criterion import gather_features
from . import register_measure
from .base import SearchMeasure


def similarity_log_rows(features: torch.Tensor, inv_temperature: float) -> torch.Tensor:
    """log softmax_k(1/T <n_i, n_k>) over the (gathered) batch, float32."""
    n = F.normalize(gather_features(features).float(), dim=-1)
    return F.log_softmax(inv_temperature * n @ n.t(), dim=1)


@register_measure
class KL(SearchMeasure):
    name = "kl"
    needs = frozenset({"original"})
    description = "KL(original || candidate) of the batch-similarity rows at 1/T"

    def __init__(self, inv_temperature: float):
        self.inv_temperature = inv_temperature

    @classmethod
    def from_importance(cls, importance) -> KL:
        return cls(importance.inv_temperature)

    def reference(self, features: torch.Tensor) -> torch.Tensor:
        return similarity_log_rows(features, self.inv_temperature)

    def __call__(self, features: torch.Tensor, extra: Any, reference: torch.Tensor
                 ) -> torch.Tensor:
        log_q = similarity_log_rows(features, self.inv_temperature)
        return (reference.exp() * (reference - log_q)).sum(dim=1).mean()
