"""Task `identification`: how often a model's embedding of a test image is nearest to the
ORIGINAL's embedding of the same image among the original's embeddings of all test images
(a vector index built with the original, queried with the evaluated model)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Row, register_task
from .labelled import FixedSideTask, check_same_space


@torch.no_grad()
def identification_rate(orig_test: torch.Tensor, test: torch.Tensor,
                        chunk: int = 1024) -> float:
    """% of rows i whose cosine similarity to `orig_test[i]` is the highest among all rows
    of `orig_test` (a tie with another row counts as found: nothing is nearer)."""
    check_same_space(orig_test, test, "identification_rate", paired=True)
    original = F.normalize(orig_test.float(), dim=1)
    queries = F.normalize(test.float(), dim=1).to(original.device)
    found = 0
    for start in range(0, len(queries), chunk):
        sim = queries[start:start + chunk] @ original.T
        rows = torch.arange(len(sim), device=sim.device)
        own = sim[rows, rows + start]
        found += int((own >= sim.max(dim=1).values).sum())
    return 100.0 * found / len(queries)


@register_task
class Identification(FixedSideTask):
    name = "identification"
    order = 23

    def score(self, original, evaluated, cfg):
        return identification_rate(original.test, evaluated.test)

    def rows(self, section):
        return [Row("identification vs original (%)", section)]
