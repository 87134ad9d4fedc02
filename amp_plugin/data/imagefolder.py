"""An ImageNet-style class-per-folder tree (`data.root`; `data.val_root` for evaluation),
read with torchvision's ImageFolder and the evaluation transform."""

from __future__ import annotations

import logging

import torch

from ..config import DataConfig
from .base import DataSource, Split, choose_disjoint, register_source
from .digits import write_digit_images
from .transforms import batches, eval_transform

log = logging.getLogger("amp")


def image_folder(root: str, cfg: DataConfig):
    from torchvision import datasets

    return datasets.ImageFolder(root, transform=eval_transform(cfg.image_size, cfg.mean,
                                                               cfg.std))


def read_items(dataset, indices, need: int | None = None, skip_bad: bool = False) -> list:
    """The first `need` (default: all) readable (image, label) items of `indices`. An
    unreadable file (truncated, empty, not an image) is an error naming it, or with
    `skip_bad` is passed over and counted in the log."""
    from PIL import UnidentifiedImageError

    items, bad = [], []
    for i in indices:
        if len(items) == need:
            break
        try:
            items.append(dataset[int(i)])
        except (OSError, UnidentifiedImageError, SyntaxError) as e:
            file = dataset.samples[int(i)][0]
            if not skip_bad:
                raise ValueError(f"data.root: {file} is not a readable image ({e}); fix or "
                                 "remove it, or set data.skip_bad_images: true") from None
            bad.append(file)
    if bad:
        log.warning("skipped %d unreadable images, first %s", len(bad), bad[0])
    if need is not None and len(items) < need:
        raise ValueError(f"data.root: {len(items)} readable images, fewer than the {need} "
                         "needed")
    return items


def stack(dataset, indices, need: int | None = None, skip_bad: bool = False) -> Split:
    items = read_items(dataset, indices, need, skip_bad)
    return Split(torch.stack([im for im, _ in items]), torch.tensor([lab for _, lab in items]))


@register_source
class ImageFolderSource(DataSource):
    name = "imagefolder"
    gives = frozenset({"labels"})
    required_keys = ("root",)

    def amp_batches(self, cfg, seed, extra=None, model=None, show_progress=True):
        ds = image_folder(cfg.root, cfg)
        need = cfg.calib_images + cfg.val_images
        choose_disjoint(len(ds), cfg.calib_images, cfg.val_images, seed, "data.root")
        # the same seeded permutation; with skip_bad_images its tail replaces bad files
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed + 1))
        both = stack(ds, order, need, cfg.skip_bad_images)
        calib = Split(both.images[:cfg.calib_images], both.labels[:cfg.calib_images])
        val = Split(both.images[cfg.calib_images:], both.labels[cfg.calib_images:])
        with_labels = extra == "labels"
        return (batches(calib.images, cfg.batch_size, False,
                        calib.labels if with_labels else None),
                batches(val.images, cfg.batch_size, True, val.labels if with_labels else None))

    def labelled_splits(self, cfg, seed, max_train=None):
        if cfg.val_root is None:
            raise ValueError("data.val_root is needed for evaluation on an image folder")
        train, test = image_folder(cfg.root, cfg), image_folder(cfg.val_root, cfg)
        g = torch.Generator().manual_seed(seed + 2)
        idx = torch.randperm(len(train), generator=g)[: max_train or len(train)]
        return {"train": stack(train, idx, skip_bad=cfg.skip_bad_images),
                "test": stack(test, range(len(test)), skip_bad=cfg.skip_bad_images)}

    def example(self, root):
        write_digit_images(root / "train", range(0, 300))
        write_digit_images(root / "val", range(300, 400))
        return {"kind": "imagefolder", "root": str(root / "train"),
                "val_root": str(root / "val"), "image_size": 32, "mean": [0.5] * 3,
                "std": [0.5] * 3, "calib_images": 128, "val_images": 128, "batch_size": 64}

    def train_images(self, cfg, seed):
        from torchvision.datasets import ImageFolder

        return ImageFolder(cfg.root), False
