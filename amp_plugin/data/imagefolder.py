"""An ImageNet-style class-per-folder tree (`data.root`; `data.val_root` for evaluation and,
with `val_from: val_root`, for the search's validation), read with torchvision's
ImageFolder and the evaluation transform or the seeded DINO augmentation."""

from __future__ import annotations

import logging

import torch
from torch.utils.data import Dataset, Subset

from ..config import DataConfig
from .augment import SeededAugment, dino_augmentation
from .base import DataSource, Split, choose_disjoint, register_source, subset_size
from .digits import write_digit_images
from .images import image_files
from .transforms import eval_transform

log = logging.getLogger("amp")


def image_folder(root: str, cfg: DataConfig, key: str = "data.root"):
    return image_files(root, eval_transform(cfg.image_size, cfg.mean, cfg.std), key)


def source_file(dataset, index: int) -> str:
    """The file behind item `index` of an ImageFolder, also through Subset and augmenting
    wrappers (their `dataset` / `indices`)."""
    while not hasattr(dataset, "samples"):
        if hasattr(dataset, "indices"):
            index = dataset.indices[index]
        if not hasattr(dataset, "dataset"):
            return f"item {index}"
        dataset = dataset.dataset
    return dataset.samples[index][0]


class CheckedImages(Dataset):
    """Items of an image dataset, an unreadable file (truncated, empty, not an image) named
    in the error; with `skip_bad` it is passed over (the next readable item stands in, so
    batch sizes and order stay fixed) and counted in the log."""

    def __init__(self, dataset: Dataset, skip_bad: bool = False):
        self.dataset, self.skip_bad, self.bad = dataset, skip_bad, []

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        from PIL import Image, UnidentifiedImageError

        for k in range(len(self.dataset)):
            j = (i + k) % len(self.dataset)
            try:
                return self.dataset[j]
            except (OSError, UnidentifiedImageError, SyntaxError,
                    Image.DecompressionBombError) as e:
                file = source_file(self.dataset, j)
                if not self.skip_bad:
                    raise ValueError(f"data.root: {file} is not a readable image ({e}); fix "
                                     "or remove it, or set data.skip_bad_images: true") from None
                if file not in self.bad:
                    self.bad.append(file)
                    log.warning("skipped %d unreadable images, first %s", len(self.bad),
                                self.bad[0])
        raise ValueError("data.root: no readable image in the folder")


def folder_datasets(cfg: DataConfig, seed: int):
    """(calibration, validation) datasets of (image tensor, label) items, in their fixed
    order: the whole folders or seeded subsets, disjoint, with the recipe's transform."""
    if cfg.transform == "dino":
        tf = dino_augmentation(cfg.image_size, cfg.dino_min_crop, cfg.mean, cfg.std)
        calib_ds = image_files(cfg.root)
        val_ds = (image_files(cfg.val_root, key="data.val_root")
                  if cfg.val_from == "val_root" else image_files(cfg.root))
    else:
        calib_ds = image_folder(cfg.root, cfg)
        val_ds = (image_folder(cfg.val_root, cfg, "data.val_root")
                  if cfg.val_from == "val_root" else calib_ds)
    if cfg.val_from == "val_root":  # two folders: disjoint by construction
        g = torch.Generator().manual_seed(seed + 1)
        n_calib = subset_size(cfg.calib_images, len(calib_ds), "data.calib_images", "data.root")
        n_val = subset_size(cfg.val_images, len(val_ds), "data.val_images", "data.val_root")
        # one shuffled pass over the train folder (a folder lists its images class by class,
        # so unshuffled batches would each hold one class); the whole val folder in its own
        # order, as an unshuffled distributed sampler reads it
        calib_idx = torch.randperm(len(calib_ds), generator=g)[:n_calib]
        val_idx = (torch.arange(len(val_ds)) if n_val == len(val_ds)
                   else torch.randperm(len(val_ds), generator=g)[:n_val])
    else:
        n_calib = (len(calib_ds) - cfg.val_images if cfg.calib_images == "all"
                   else cfg.calib_images)
        order = choose_disjoint(len(calib_ds), n_calib, cfg.val_images, seed, "data.root")
        calib_idx, val_idx = order[:n_calib], order[n_calib:]
    calib, val = Subset(calib_ds, calib_idx.tolist()), Subset(val_ds, val_idx.tolist())
    if cfg.transform == "dino":
        # seeds differ between the two sets, so image i of each gets its own draw
        calib, val = SeededAugment(calib, tf, 2 * seed), SeededAugment(val, tf, 2 * seed + 1)
    return calib, val


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

    transforms = ("eval", "dino")
    separate_val = True

    def amp_datasets(self, cfg, seed, extra=None, model=None, show_progress=True):
        calib, val = (CheckedImages(ds, cfg.skip_bad_images)
                      for ds in folder_datasets(cfg, seed))
        if extra != "labels":
            calib, val = ImagesOnly(calib), ImagesOnly(val)
        return calib, val

    def labelled_splits(self, cfg, seed, max_train=None):
        if cfg.val_root is None:
            raise ValueError("data.val_root is needed for evaluation on an image folder")
        train, test = image_folder(cfg.root, cfg), image_folder(cfg.val_root, cfg,
                                                                "data.val_root")
        g = torch.Generator().manual_seed(seed + 2)
        idx = torch.randperm(len(train), generator=g)[: max_train or len(train)]
        train = CheckedImages(train, cfg.skip_bad_images)
        test = CheckedImages(test, cfg.skip_bad_images)
        return {"train": stack(train, idx), "test": stack(test, range(len(test)))}

    def example(self, root):
        write_digit_images(root / "train", range(0, 300))
        write_digit_images(root / "val", range(300, 400))
        return {"kind": "imagefolder", "root": str(root / "train"),
                "val_root": str(root / "val"), "image_size": 32, "mean": [0.5] * 3,
                "std": [0.5] * 3, "calib_images": 128, "val_images": 128, "batch_size": 64,
                "workers": 2}

    def train_images(self, cfg, seed):
        return image_files(cfg.root), False
