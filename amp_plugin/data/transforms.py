"""Image transforms, defined once: the evaluation transform (resize bicubic, centre crop,
normalise), tensors to model input, and fixed-size batching."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def eval_transform(image_size: int, mean, std):
    """PIL image -> normalised tensor, as CLIP/EVA evaluate (bicubic resize, centre crop)."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def to_model_input(x: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """(N, 1|3, h, w) in [0, 1] -> (N, 3, size, size) normalised."""
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return ((x - m) / s).contiguous()


def batches(images: torch.Tensor, batch_size: int, drop_last: bool = True,
            labels: torch.Tensor | None = None) -> list:
    """Consecutive batches (images, or (images, labels) pairs with `labels`)."""
    n = len(images) - (len(images) % batch_size if drop_last else 0)
    out = [images[i:i + batch_size] for i in range(0, n, batch_size)]
    if labels is None:
        return out
    return [(x, labels[i:i + batch_size]) for x, i in zip(out, range(0, n, batch_size))]
