"""Pooled features of a vision tower over a tensor or a loader of images."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..core.adapter import vision_tower
from ..utils.progress import progress
from ..utils.tensors import device_of


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
