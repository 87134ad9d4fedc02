"""Task `prototype`: each test image goes to the nearest class mean of the ORIGINAL
model's train features (a zero-shot stand-in: the class embeddings stay the original's)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Row, register_task
from .labelled import FixedSideTask, check_same_space


@torch.no_grad()
def prototype_accuracy(orig_train: torch.Tensor, train_labels: torch.Tensor,
                       test: torch.Tensor, test_labels: torch.Tensor) -> float:
    """Top-1 accuracy in % of nearest-prototype classification: the prototypes are the
    class means of the L2-normalised `orig_train` features; a test feature goes to the
    prototype of highest cosine similarity."""
    if len(orig_train) != len(train_labels) or len(test) != len(test_labels):
        raise ValueError("prototype_accuracy: features and labels differ in length")
    check_same_space(orig_train, test, "prototype_accuracy")
    train = F.normalize(orig_train.float(), dim=1)
    labels = train_labels.long().to(train.device)
    classes, index = labels.unique(return_inverse=True)
    sums = torch.zeros(len(classes), train.shape[1], device=train.device)
    sums.index_add_(0, index, train)
    prototypes = F.normalize(sums, dim=1)  # the mean's direction: the count drops out
    sim = F.normalize(test.float(), dim=1).to(train.device) @ prototypes.T
    predicted = classes[sim.argmax(dim=1)]
    return 100.0 * float((predicted == test_labels.long().to(train.device)).float().mean())


@register_task
class Prototype(FixedSideTask):
    name = "prototype"
    order = 21

    def score(self, original, evaluated, cfg):
        return prototype_accuracy(original.train, original.train_labels, evaluated.test,
                                  evaluated.test_labels)

    def rows(self, section):
        return [Row("original's prototypes (%)", section, new_section=True)]
