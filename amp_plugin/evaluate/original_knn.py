"""Task `original_knn`: the evaluated model's test features looked up in an index built
with the ORIGINAL model (its train features and labels), by the kNN task's weighted vote."""

from __future__ import annotations

import torch

from .base import Row, register_task
from .features import knn_top1
from .labelled import FixedSideTask, check_same_space


def original_knn_top1(orig_train: torch.Tensor, train_labels: torch.Tensor,
                      test: torch.Tensor, test_labels: torch.Tensor, k: int = 20,
                      temperature: float = 0.07) -> float:
    """Weighted kNN top-1 in % (as `knn_top1`) of `test` against the original's index."""
    check_same_space(orig_train, test, "original_knn_top1")
    return knn_top1(orig_train, train_labels, test, test_labels, k=k, temperature=temperature)


@register_task
class OriginalKNN(FixedSideTask):
    name = "original_knn"
    order = 22

    def score(self, original, evaluated, cfg):
        return original_knn_top1(original.train, original.train_labels, evaluated.test,
                                 evaluated.test_labels, k=cfg.knn_k,
                                 temperature=cfg.knn_temperature)

    def rows(self, section):
        return [Row("kNN, original's index (%)", section)]
