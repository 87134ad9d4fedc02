"""The label-based tasks on a model's own features: DINO's weighted kNN and a
logistic-regression linear probe, both fitted on the evaluated model's train features
(tasks `knn`, `linear_probe`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Row, register_task
from .extract import extract_features
from .labelled import LabelTask

__all__ = ["KNN", "LinearProbe", "extract_features", "knn_top1", "linear_probe"]


@torch.no_grad()
def knn_top1(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
             test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07,
             chunk: int = 1024) -> float:
    """Weighted kNN top-1 accuracy in % (DINO, Caron et al. 2021, eval_knn.py).

    Cosine similarity to the k nearest training features; each neighbour votes for its
    class with weight exp(sim / temperature). scikit-learn's KNeighborsClassifier gives
    the same vote on the CPU only; this runs on the features' device in chunks.
    """
    if len(train_feats) != len(train_labels) or len(test_feats) != len(test_labels):
        raise ValueError("features and labels differ in length")
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1).to(train.device)
    train_labels = train_labels.long().to(train.device)
    test_labels = test_labels.long().to(train.device)
    k = min(k, len(train))
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    correct = 0
    for start in range(0, len(test), chunk):
        sim = test[start:start + chunk] @ train.T
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes, device=sim.device)
        votes.scatter_add_(1, train_labels[top_idx], (top_sim / temperature).exp())
        correct += int((votes.argmax(dim=1) == test_labels[start:start + chunk]).sum())
    return 100.0 * correct / len(test)


def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, c: float = 1.0, max_iter: int = 1000,
                 seed: int = 0) -> float:
    """Test accuracy in % of a logistic regression fitted on L2-normalised features."""
    from sklearn.linear_model import LogisticRegression

    def prep(x):
        return F.normalize(x.float(), dim=1).cpu().numpy()

    clf = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    clf.fit(prep(train_feats), train_labels.cpu().numpy())
    return 100.0 * float(clf.score(prep(test_feats), test_labels.cpu().numpy()))


# ---- tasks ---------------------------------------------------------------------------------
@register_task
class KNN(LabelTask):
    name = "knn"
    order = 10
    key = "accuracy"

    def run(self, model, role, cfg, ctx):
        acc = knn_top1(*self.features(model, role, cfg, ctx), k=cfg.knn_k,
                       temperature=cfg.knn_temperature)
        ctx.log(f"{role}: kNN top-1 {acc:.2f}%")
        return acc

    def rows(self, section):
        return [Row("kNN top-1 (%)", section)]


@register_task
class LinearProbe(LabelTask):
    name = "linear_probe"
    order = 20

    def run(self, model, role, cfg, ctx):
        acc = linear_probe(*self.features(model, role, cfg, ctx), c=cfg.linear_probe_c,
                           seed=ctx.seed)
        ctx.log(f"{role}: linear probe {acc:.2f}%")
        return acc

    def rows(self, section):
        return [Row("linear probe (%)", section)]
