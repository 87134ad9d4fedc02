"""scikit-learn's bundled 8x8 digits (1797 real images, 10 classes), upsampled to the
model's input size and split train/test with a seed (data.split_seed, else the recipe's
seed). No download."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from .base import DataSource, Split, choose_disjoint, register_source
from .loader import TensorItems
from .transforms import to_model_input


def digits_raw() -> tuple[torch.Tensor, torch.Tensor]:
    """All digits images as (N, 1, 8, 8) floats in [0, 1] and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float().unsqueeze(1) / 16.0
    return x, torch.from_numpy(d.target).long()


def digits_splits(cfg: DataConfig, seed: int, raw: bool = False) -> dict[str, Split]:
    """Seeded train/test split of the digits (`cfg.split_seed` when set, else `seed`);
    `raw` keeps the 8x8 [0, 1] images."""
    x, y = digits_raw()
    seed = seed if cfg.split_seed is None else cfg.split_seed
    perm = torch.from_numpy(np.random.RandomState(seed).permutation(len(x)))
    n_test = int(round(cfg.test_fraction * len(x)))
    parts = {"test": perm[:n_test], "train": perm[n_test:]}
    out = {}
    for name, idx in parts.items():
        images = x[idx] if raw else to_model_input(x[idx], cfg.image_size, cfg.mean, cfg.std)
        out[name] = Split(images, y[idx])
    return out


@register_source
class Digits(DataSource):
    name = "digits"
    gives = frozenset({"labels"})

    def amp_datasets(self, cfg, seed, extra=None, model=None, show_progress=True):
        train = digits_splits(cfg, seed)["train"]
        n = len(train.images)
        n_calib = n - cfg.val_images if cfg.calib_images == "all" else cfg.calib_images
        order = choose_disjoint(n, n_calib, cfg.val_images, seed, "the digits training split")
        labels = train.labels if extra == "labels" else None
        return tuple(TensorItems(train.images[idx], None if labels is None else labels[idx])
                     for idx in (order[:n_calib], order[n_calib:]))

    def labelled_splits(self, cfg, seed, max_train=None):
        return digits_splits(cfg, seed)

    def example(self, root):
        return {"kind": "digits", "image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3,
                "calib_images": 128, "val_images": 128, "batch_size": 64}

    def train_images(self, cfg, seed):
        images = digits_splits(cfg, seed, raw=True)["train"].images
        return images.expand(-1, 3, -1, -1).contiguous(), True


DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def write_digit_images(folder: Path, indices, size: int = 32) -> list[Path]:
    """Digits images `indices` as RGB PNG files `folder/<digit name>/<index>.png`."""
    from PIL import Image

    x, y = digits_raw()
    paths = []
    for i in indices:
        im = Image.fromarray((x[i, 0].numpy() * 255).astype("uint8")).resize((size, size))
        path = folder / DIGIT_NAMES[int(y[i])] / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        im.convert("RGB").save(path)
        paths.append(path)
    return paths
