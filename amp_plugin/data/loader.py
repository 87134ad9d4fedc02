"""Calibration and validation DataLoaders over a source's datasets, never materialised.

Fixed order (no shuffling): global batch t holds items t*B .. t*B+B-1 of the dataset,
the seeded order its source chose. Under torchrun each rank reads its share of every
global batch through torch's DistributedSampler (B / world_size items per rank and
batch). `start_batch` skips the batches already consumed, for a resumed pass. Validation drops
its last incomplete batch; calibration keeps it unless it would hold a single image (the
batch criteria compare the images of a batch: one image alone carries nothing and is
refused by `AMPImportance.accumulate`).
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from ..utils import dist as ddp


class TensorItems(Dataset):
    """Items of tensors already in memory (image, or (image, extra)); read without workers."""

    in_memory = True

    def __init__(self, images: torch.Tensor, extra: torch.Tensor | None = None):
        self.images, self.extra = images, extra

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i] if self.extra is None else (self.images[i], self.extra[i])


def rank_indices(n: int, batch_size: int) -> tuple[list[int], int]:
    """(this rank's item indices in order, items per rank and batch)."""
    world = ddp.world_size()
    if batch_size % world:
        raise ValueError(f"data.batch_size {batch_size} does not split evenly over {world} "
                         "ranks")
    if world == 1:
        return list(range(n)), batch_size
    sampler = DistributedSampler(range(n), world, ddp.rank(), shuffle=False, drop_last=True)
    return list(sampler), batch_size // world


def calibration_images(n: int, batch_size: int) -> int:
    """How many of `n` calibration images the pass reads: all, but for a last batch of
    a single image."""
    return n - 1 if n % batch_size == 1 and n > 1 else n


def amp_loader(dataset: Dataset, batch_size: int, workers: int, drop_last: bool,
               start_batch: int = 0) -> DataLoader:
    """This rank's batches of `dataset` (global batch size `batch_size`) from `start_batch`;
    without `drop_last` (calibration) a last batch of one image is left out."""
    n = len(dataset) if drop_last else calibration_images(len(dataset), batch_size)
    indices, local = rank_indices(n, batch_size)
    workers = 0 if getattr(dataset, "in_memory", False) else workers
    return DataLoader(Subset(dataset, indices[start_batch * local:]), batch_size=local,
                      shuffle=False, drop_last=drop_last, num_workers=workers)
