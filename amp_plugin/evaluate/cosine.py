"""Task `cosine_to_original`: mean cosine similarity between a model's and the ORIGINAL
model's embedding of each test image (1 for the original itself)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Row, register_task
from .labelled import FixedSideTask, check_same_space


@torch.no_grad()
def cosine_to_original(orig_test: torch.Tensor, test: torch.Tensor) -> float:
    """Mean over rows of cos(orig_test[i], test[i])."""
    check_same_space(orig_test, test, "cosine_to_original", paired=True)
    cos = F.cosine_similarity(orig_test.float(), test.float().to(orig_test.device), dim=1)
    return float(cos.mean())


@register_task
class CosineToOriginal(FixedSideTask):
    name = "cosine_to_original"
    order = 24

    def score(self, original, evaluated, cfg):
        return cosine_to_original(original.test, evaluated.test)

    def rows(self, section):
        return [Row("cosine to original", section, fmt="ratio")]
