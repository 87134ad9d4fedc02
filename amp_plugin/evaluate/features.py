"""Features of a vision tower and the label-based tasks on them: DINO's weighted kNN and
a logistic-regression linear probe (tasks `knn`, `linear_probe`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import vision_tower
from ..utils.progress import progress
from ..utils.tensors import device_of
from .base import EvalContext, EvalTask, Row, register_task


def _image_batches(images_or_loader, batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(images_or_loader, torch.Tensor):
        return [images_or_loader[i:i + batch_size]
                for i in range(0, len(images_or_loader), batch_size)]
    return images_or_loader


@torch.no_grad()
def extract_features(model: nn.Module, images_or_loader: torch.Tensor | Iterable,
                     batch_size: int = 256, feature_fn: Callable | None = None,
                     description: str = "features", show_progress: bool = True) -> torch.Tensor:
    """Pooled features (float32, on the CPU) of a (N, 3, H, W) tensor or of a loader of
    image batches / (images, labels) pairs, in order.

    Default features: `adapter.features` of the vision tower, i.e. what the AMP criterion
    measures; `feature_fn(model, images)` replaces it.
    """
    was_training = model.training
    model.eval()
    device = device_of(model)
    dtype = next(model.parameters()).dtype
    tower, adapter = vision_tower(model)
    out = []
    try:
        for batch in progress(_image_batches(images_or_loader, batch_size), description,
                              enabled=show_progress):
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            images = images.to(device, dtype)
            feats = feature_fn(model, images) if feature_fn else adapter.features(tower, images)
            out.append(feats.float().cpu())
    finally:
        model.train(was_training)
    if not out:
        raise ValueError("extract_features: no images")
    return torch.cat(out)


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
class _LabelTask(EvalTask):
    needs_labels = True

    def check(self, cfg, ctx, model):
        if "labels" not in ctx.source.gives:
            raise ValueError(f"eval task {self.name} needs labelled images: data.kind "
                             f"{ctx.data.kind!r} gives none (use digits or imagefolder with "
                             "data.val_root)")

    def features(self, model: nn.Module, role: str, cfg, ctx: EvalContext):
        """(train features, train labels, test features, test labels), once per role."""
        splits = ctx.once("labelled_splits", lambda: ctx.source.labelled_splits(
            ctx.data, ctx.seed, max_train=cfg.max_train))

        def extract():
            feats = {s: extract_features(model, splits[s].images, cfg.batch_size,
                                         description=f"{role}: {s} features",
                                         show_progress=ctx.show_progress)
                     for s in ("train", "test")}
            return (feats["train"], splits["train"].labels, feats["test"],
                    splits["test"].labels)
        return ctx.once(("features", role, id(model)), extract)


@register_task
class KNN(_LabelTask):
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
class LinearProbe(_LabelTask):
    name = "linear_probe"
    order = 20

    def run(self, model, role, cfg, ctx):
        acc = linear_probe(*self.features(model, role, cfg, ctx), c=cfg.linear_probe_c,
                           seed=ctx.seed)
        ctx.log(f"{role}: linear probe {acc:.2f}%")
        return acc

    def rows(self, section):
        return [Row("linear probe (%)", section)]
