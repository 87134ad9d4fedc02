"""The data-source protocol and its registry.

A data source turns the recipe's `data` section into (a) the calibration and validation
datasets of the score and prune stages, in a fixed order chosen by the seed (`amp_datasets`;
`loader.amp_loader` streams them in batches, sharded over ranks, never materialised), (b)
labelled train/test splits for kNN and linear-probe evaluation, and (c) training images
for distillation and the demo teacher. It declares what its AMP batches can carry
besides images (`gives`: labels, text), so a criterion that needs more is refused when
the recipe is loaded.

A new source is one module in this package with a `@register_source` class, plus one
import line in `amp_plugin/data/__init__.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from ..config import DataConfig
from ..utils.registry import Registry
from .loader import amp_loader


@dataclass
class Split:
    images: torch.Tensor  # (N, 3, S, S), normalised model input
    labels: torch.Tensor  # (N,)


class DataSource:
    name = "base"
    gives: frozenset[str] = frozenset()  # what AMP batches can carry: "labels", "text"
    required_keys: tuple[str, ...] = ()  # data.<key> that must be set
    transforms: tuple[str, ...] = ("eval",)  # data.transform values it can apply
    separate_val = False  # can validate on data.val_root (data.val_from: val_root)

    def check(self, cfg: DataConfig) -> None:
        """Refuse, before any work, input files whose content is wrong (the recipe checks
        only that they exist); reading the images waits for the stage that needs them."""

    def amp_datasets(self, cfg: DataConfig, seed: int, extra: str | None = None,
                     model: nn.Module | None = None, show_progress: bool = True
                     ) -> tuple[Dataset, Dataset]:
        """(calibration, validation) map-style datasets of `cfg.calib_images` and
        `cfg.val_images` items in the order fixed by the seed; an item is an image, or an
        (image, extra) pair where `extra` names what the criterion needs. Items are read
        lazily where the source is on disk."""
        raise NotImplementedError

    def amp_batches(self, cfg: DataConfig, seed: int, extra: str | None = None,
                    model: nn.Module | None = None, show_progress: bool = True
                    ) -> tuple[list, list]:
        """(calibration, validation) batches of this rank as lists, as `amp_loader` streams
        them (validation drops its last incomplete batch, docs/algorithm.md section 3); for small
        subsets, since everything is held in memory."""
        calib, val = self.amp_datasets(cfg, seed, extra, model, show_progress)
        return (list(amp_loader(calib, cfg.batch_size, cfg.workers, False)),
                list(amp_loader(val, cfg.batch_size, cfg.workers, True)))

    def labelled_splits(self, cfg: DataConfig, seed: int,
                        max_train: int | None = None) -> dict[str, Split]:
        raise ValueError(f"data.kind {self.name!r} has no labelled splits (kNN and linear "
                         "probe need digits or imagefolder data)")

    def example(self, root: Path) -> dict:
        """A small instance of this source written under `root` from the digits (the
        `data` section that reads it), for the contract tests of every source."""
        raise NotImplementedError

    def train_images(self, cfg: DataConfig, seed: int):
        """(images, tensor_input): an indexable set of training images for distillation:
        a (N, C, H, W) tensor in [0, 1] (tensor_input True) or PIL images."""
        raise ValueError(f"data.kind {self.name!r} has no training images to distill on: set "
                         "distill.root to an ImageNet-style training folder")


_SOURCES: Registry[DataSource] = Registry("data.kind")


def register_source(cls: type[DataSource]) -> type[DataSource]:
    return _SOURCES.register_class(cls)


def list_sources() -> list[str]:
    return _SOURCES.names()


def get_source(name: str) -> DataSource:
    return _SOURCES.get(name)


def choose_disjoint(n: int, calib: int, val: int, seed: int, what: str) -> torch.Tensor:
    """A seeded permutation of n items: the first `calib` calibrate, the next `val` validate."""
    need = calib + val
    if need > n:
        raise ValueError(f"data.calib_images + data.val_images = {need} exceeds the {n} "
                         f"images of {what}")
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))[:need]



def subset_size(requested: int | str, available: int, key: str, what: str) -> int:
    """`requested` images ("all": every one) out of `available`, checked."""
    if requested == "all":
        return available
    if requested > available:
        raise ValueError(f"{key} = {requested} exceeds the {available} images of {what}")
    return requested
