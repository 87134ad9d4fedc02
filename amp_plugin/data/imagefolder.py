"""An ImageNet-style class-per-folder tree (`data.root`; `data.val_root` for evaluation),
read with torchvision's ImageFolder and the evaluation transform."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, Subset

from ..config import DataConfig
from .base import DataSource, Split, choose_disjoint, register_source
from .digits import write_digit_images
from .transforms import eval_transform


def image_folder(root: str, cfg: DataConfig):
    from torchvision import datasets

    return datasets.ImageFolder(root, transform=eval_transform(cfg.image_size, cfg.mean,
                                                               cfg.std))


class ImagesOnly(Dataset):
    """The images of a labelled dataset (criteria that need no labels)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.dataset[i][0]


def stack(dataset, indices) -> Split:
    items = [dataset[int(i)] for i in indices]
    return Split(torch.stack([im for im, _ in items]), torch.tensor([lab for _, lab in items]))


@register_source
class ImageFolderSource(DataSource):
    name = "imagefolder"
    gives = frozenset({"labels"})
    required_keys = ("root",)

    def amp_datasets(self, cfg, seed, extra=None, model=None, show_progress=True):
        ds = image_folder(cfg.root, cfg)
        order = choose_disjoint(len(ds), cfg.calib_images, cfg.val_images, seed, "data.root")
        if extra != "labels":
            ds = ImagesOnly(ds)
        return (Subset(ds, order[:cfg.calib_images].tolist()),
                Subset(ds, order[cfg.calib_images:].tolist()))

    def labelled_splits(self, cfg, seed, max_train=None):
        if cfg.val_root is None:
            raise ValueError("data.val_root is needed for evaluation on an image folder")
        train, test = image_folder(cfg.root, cfg), image_folder(cfg.val_root, cfg)
        g = torch.Generator().manual_seed(seed + 2)
        idx = torch.randperm(len(train), generator=g)[: max_train or len(train)]
        return {"train": stack(train, idx), "test": stack(test, range(len(test)))}

    def example(self, root):
        write_digit_images(root / "train", range(0, 300))
        write_digit_images(root / "val", range(300, 400))
        return {"kind": "imagefolder", "root": str(root / "train"),
                "val_root": str(root / "val"), "image_size": 32, "mean": [0.5] * 3,
                "std": [0.5] * 3, "calib_images": 128, "val_images": 128, "batch_size": 64,
                "workers": 2}

    def train_images(self, cfg, seed):
        from torchvision.datasets import ImageFolder

        return ImageFolder(cfg.root), False
