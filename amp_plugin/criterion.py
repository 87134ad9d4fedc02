"""Label-free criteria that AMP differentiates (ALGORITHM.md section 1).

Every criterion maps a batch of features (plus an optional per-batch `extra`: text
features for CLIP, labels for the one-hot baseline) to a scalar loss in float32.
With several data-parallel ranks the batch is the global batch: features are
all-gathered with the gradient kept on the local shard, as in CLIP training.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

Criterion = Callable[[torch.Tensor, object], torch.Tensor]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_features(features: torch.Tensor) -> torch.Tensor:
    """All-gather `features` along the batch; only the local shard keeps its gradient."""
    if not _distributed():
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


CRITERIA = ("entropy", "clip_entropy", "one_hot")


def make_criterion(name: str, inv_temperature: float) -> Criterion:
    """Return `loss(features, extra)` for a criterion name of CRITERIA."""
    if name == "entropy":
        return lambda f, extra=None: entropy_loss(f, inv_temperature)
    if name == "clip_entropy":
        def clip(f, extra):
            if extra is None:
                raise ValueError("criterion 'clip_entropy' needs text features with each batch")
            return clip_entropy_loss(f, extra, inv_temperature)
        return clip
    if name == "one_hot":
        def one_hot(f, extra):
            if extra is None:
                raise ValueError("criterion 'one_hot' needs labels or text features per batch")
            return one_hot_loss(f, extra, inv_temperature)
        return one_hot
    raise ValueError(f"unknown criterion {name!r}; expected one of {', '.join(CRITERIA)}")
