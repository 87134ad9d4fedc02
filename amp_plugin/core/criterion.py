"""Label-free criteria that AMP differentiates (docs/algorithm.md section 1), and a registry.

Every criterion maps a batch of features (plus an optional per-batch `extra`: text
features for CLIP, labels for the one-hot baseline) to a scalar loss in float32.
With several data-parallel ranks the batch is the global batch: features are
all-gathered with the gradient kept on the local shard, as in CLIP training.

A registered criterion declares what each batch must carry (`needs`: nothing, text or
labels) and whether image features are projected into the joint image-text space first
(`projected`), so a recipe that cannot feed it is refused before any work.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..utils.dist import is_distributed
from ..utils.registry import Registry

Criterion = Callable[[torch.Tensor, object], torch.Tensor]
Needs = Literal["nothing", "text", "labels", "text_or_labels"]


def gather_features(features: torch.Tensor) -> torch.Tensor:
    """All-gather `features` along the batch; only the local shard keeps its gradient."""
    if not is_distributed():
        return features
    shards = [torch.empty_like(features) for _ in range(dist.get_world_size())]
    dist.all_gather(shards, features.detach().contiguous())
    shards[dist.get_rank()] = features
    return torch.cat(shards, dim=0)


def _entropy_of_similarities(rows: torch.Tensor, cols: torch.Tensor, inv_temperature: float):
    logits = inv_temperature * rows @ cols.t()
    log_p = F.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1).mean()


def entropy_loss(features: torch.Tensor, inv_temperature: float) -> torch.Tensor:
    """Mean entropy of each image's softmax similarity to all images of the batch."""
    n = F.normalize(gather_features(features).float(), dim=-1)
    return _entropy_of_similarities(n, n, inv_temperature)


def clip_entropy_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, inv_temperature: float
) -> torch.Tensor:
    """0.5 * (E(image -> texts) + E(text -> images)); text features carry no gradient."""
    img = F.normalize(gather_features(image_features).float(), dim=-1)
    txt = F.normalize(gather_features(text_features.detach()).float(), dim=-1)
    return 0.5 * (
        _entropy_of_similarities(img, txt, inv_temperature)
        + _entropy_of_similarities(txt, img, inv_temperature)
    )


def one_hot_loss(
    features: torch.Tensor, targets: torch.Tensor, inv_temperature: float
) -> torch.Tensor:
    """The one-hot baseline the paper argues against, kept for ablations.

    `targets` are either class labels (integer tensor; `features` are then logits)
    or text features of the matching captions (CLIP contrastive loss, diagonal labels).
    """
    if targets.dtype in (torch.int64, torch.int32):
        return F.cross_entropy(features.float(), targets.to(features.device))
    img = F.normalize(gather_features(features).float(), dim=-1)
    txt = F.normalize(gather_features(targets.detach()).float(), dim=-1)
    logits = inv_temperature * img @ txt.t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def is_text(extra) -> bool:
    """Text features ride along with image-text batches (labels are integers)."""
    return isinstance(extra, torch.Tensor) and extra.is_floating_point()


# ---- registry ------------------------------------------------------------------------------
@dataclass(frozen=True)
class CriterionInfo:
    """A registered criterion: `build(inv_temperature) -> loss(features, extra)`."""

    name: str
    build: Callable[[float], Criterion]
    needs: Needs = "nothing"
    # image features go through the CLIP projection first: always, or only when the batch
    # carries text features (the one-hot CLIP contrastive loss; with labels it does not)
    projected: bool | Literal["with_text"] = False

    def projects(self, extra_is_text: bool) -> bool:
        return self.projected is True or (self.projected == "with_text" and extra_is_text)

    def accepts(self, gives: set[str]) -> bool:
        """Whether batches carrying `gives` (a subset of {"text", "labels"}) feed it."""
        if self.needs == "nothing":
            return True
        if self.needs == "text_or_labels":
            return bool(gives & {"text", "labels"})
        return self.needs in gives


_CRITERIA: Registry[CriterionInfo] = Registry("criterion")


def register_criterion(name: str, needs: Needs = "nothing",
                       projected: bool | Literal["with_text"] = False):
    """Decorator registering `build(inv_temperature) -> loss(features, extra)`."""
    def deco(build: Callable[[float], Criterion]):
        _CRITERIA.register(name, CriterionInfo(name, build, needs, projected))
        return build
    return deco


def list_criteria() -> list[str]:
    return _CRITERIA.names()


def criterion_info(name: str) -> CriterionInfo:
    return _CRITERIA.get(name)


def make_criterion(name: str, inv_temperature: float) -> Criterion:
    """Return `loss(features, extra)` for a registered criterion name."""
    return criterion_info(name).build(inv_temperature)


def _require(name: str, extra, what: str) -> None:
    if extra is None:
        raise ValueError(f"criterion {name!r} needs {what} with each batch")


@register_criterion("entropy")
def _entropy(inv_temperature: float) -> Criterion:
    return lambda f, extra=None: entropy_loss(f, inv_temperature)


@register_criterion("clip_entropy", needs="text", projected=True)
def _clip_entropy(inv_temperature: float) -> Criterion:
    def loss(f, extra):
        _require("clip_entropy", extra, "text features")
        return clip_entropy_loss(f, extra, inv_temperature)
    return loss


@register_criterion("one_hot", needs="text_or_labels", projected="with_text")
def _one_hot(inv_temperature: float) -> Criterion:
    def loss(f, extra):
        _require("one_hot", extra, "labels or text features")
        return one_hot_loss(f, extra, inv_temperature)
    return loss
