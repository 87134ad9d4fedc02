"""Data for scoring, the entropy test and evaluation, from local sources only.

`digits`: scikit-learn's bundled 8x8 digits (1797 real images, 10 classes), upsampled
to the model's input size, split train/test with the recipe's seed. `imagefolder`: an
ImageNet-style class-per-folder tree read with torchvision.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .recipe import DataConfig


@dataclass
class Split:
    images: torch.Tensor  # (N, 3, S, S), normalised model input
    labels: torch.Tensor  # (N,)


def digits_raw() -> tuple[torch.Tensor, torch.Tensor]:
    """All digits images as (N, 1, 8, 8) floats in [0, 1] and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float().unsqueeze(1) / 16.0
    return x, torch.from_numpy(d.target).long()


def to_model_input(x: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """(N, 1|3, h, w) in [0, 1] -> (N, 3, size, size) normalised."""
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return ((x - m) / s).contiguous()


def digits_splits(cfg: DataConfig, seed: int, raw: bool = False) -> dict[str, Split]:
    """Seeded train/test split of the digits; `raw` keeps the 8x8 [0, 1] images."""
    x, y = digits_raw()
    perm = torch.from_numpy(np.random.RandomState(seed).permutation(len(x)))
    n_test = int(round(cfg.test_fraction * len(x)))
    parts = {"test": perm[:n_test], "train": perm[n_test:]}
    out = {}
    for name, idx in parts.items():
        images = x[idx] if raw else to_model_input(x[idx], cfg.image_size, cfg.mean, cfg.std)
        out[name] = Split(images, y[idx])
    return out


def batches(images: torch.Tensor, batch_size: int, drop_last: bool = True) -> list[torch.Tensor]:
    n = len(images) - (len(images) % batch_size if drop_last else 0)
    return [images[i:i + batch_size] for i in range(0, n, batch_size)]


def _imagefolder(root: str, cfg: DataConfig):
    from torchvision import datasets, transforms

    tf = transforms.Compose([
        transforms.Resize(cfg.image_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(cfg.image_size),
        transforms.ToTensor(),
        transforms.Normalize(cfg.mean, cfg.std),
    ])
    return datasets.ImageFolder(root, transform=tf)


def _stack(dataset, indices) -> Split:
    items = [dataset[int(i)] for i in indices]
    return Split(torch.stack([im for im, _ in items]), torch.tensor([lab for _, lab in items]))


def amp_batches(cfg: DataConfig, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(calibration batches, validation batches) of images, fixed by the seed.

    Both come from the training data, disjoint; the last incomplete validation batch is
    dropped (ALGORITHM.md 3), and the order is the same for the whole run.
    """
    if cfg.kind == "digits":
        train = digits_splits(cfg, seed)["train"].images
        g = torch.Generator().manual_seed(seed + 1)
        order = torch.randperm(len(train), generator=g)
        need = cfg.calib_images + cfg.val_images
        if need > len(train):
            raise ValueError(f"data.calib_images + data.val_images = {need} exceeds the "
                             f"{len(train)} digits training images")
        calib = train[order[:cfg.calib_images]]
        val = train[order[cfg.calib_images:need]]
    elif cfg.kind == "imagefolder":
        ds = _imagefolder(cfg.root, cfg)
        g = torch.Generator().manual_seed(seed + 1)
        order = torch.randperm(len(ds), generator=g)
        need = cfg.calib_images + cfg.val_images
        if need > len(ds):
            raise ValueError(f"data.root holds {len(ds)} images, fewer than the {need} "
                             "that calib_images + val_images ask for")
        calib = _stack(ds, order[:cfg.calib_images]).images
        val = _stack(ds, order[cfg.calib_images:need]).images
    else:
        raise ValueError(f"data.kind {cfg.kind!r} has no image-only batches; "
                         "use amp_plugin.datasets for captioned data")
    return batches(calib, cfg.batch_size, drop_last=False), batches(val, cfg.batch_size)


def labelled_splits(cfg: DataConfig, seed: int, max_train: int | None = None) -> dict[str, Split]:
    """Train/test images with labels, for kNN and linear-probe evaluation."""
    if cfg.kind == "digits":
        return digits_splits(cfg, seed)
    if cfg.kind == "imagefolder":
        if cfg.val_root is None:
            raise ValueError("data.val_root is needed for evaluation on an image folder")
        train, test = _imagefolder(cfg.root, cfg), _imagefolder(cfg.val_root, cfg)
        g = torch.Generator().manual_seed(seed + 2)
        idx = torch.randperm(len(train), generator=g)[: max_train or len(train)]
        return {"train": _stack(train, idx), "test": _stack(test, range(len(test)))}
    raise ValueError(f"data.kind {cfg.kind!r} has no labelled splits")
