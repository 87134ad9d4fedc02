"""Training images for distillation, in an order that a resumed run reproduces exactly.

The order of an epoch comes from torch's `DistributedSampler` (seed + epoch, one shard
per rank); each image is augmented (`distill.augment`: RandomResizedCrop from `min_crop`,
with a flip, or DINOv2's augmentation) under a seed derived from (run seed, epoch, index),
so that step k of a resumed run sees the same pixels as step k of an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..data.augment import augmentation, seeded_draw

Key = tuple[int, int]  # (image index, crop seed)


def train_transform(image_size: int, min_crop: float, mean, std, tensor_input: bool,
                    augment: str = "crop"):
    """The distillation augmentation `augment` (crop, crop_flip, dino) from `min_crop`."""
    return augmentation(augment, image_size, min_crop, mean, std, tensor_input)


class SeededCrops(Dataset):
    """Wraps an image source; item (index, seed) is image `index` cropped under `seed`.

    torchvision's random transforms draw from the global torch generator, so the draw is
    made inside `fork_rng` with that seed; the caller's random state is left untouched.
    """

    def __init__(self, images, transform):
        self.images = images  # indexable: a (N, C, H, W) tensor or an ImageFolder
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: Key) -> torch.Tensor:
        index, seed = key
        item = self.images[index]
        image = item[0] if isinstance(item, tuple) else item
        return seeded_draw(self.transform, image, seed)


@dataclass
class DistillData:
    """Fixed-size micro-batches per rank; `batches(step)` starts anywhere in the run."""

    dataset: SeededCrops
    micro_batch: int
    grad_accum: int
    world_size: int
    rank: int
    seed: int
    workers: int = 0
    pin_memory: bool = False

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (every rank drops the same incomplete tail)."""
        per_rank = len(self.dataset) // self.world_size
        return per_rank // self.micro_batch // self.grad_accum

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    def _epoch_keys(self, epoch: int) -> list[Key]:
        sampler = DistributedSampler(self.dataset, num_replicas=self.world_size, rank=self.rank,
                                     shuffle=True, seed=self.seed, drop_last=True)
        sampler.set_epoch(epoch)
        base = (self.seed * 1_000_003 + epoch) * len(self.dataset)
        return [(i, base + i) for i in sampler]

    def batches(self, step: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(epoch, micro-batch) pairs from optimizer step `step` on, without end."""
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"{len(self.dataset)} training images make no full step of "
                f"{self.global_batch} (batch_size x grad_accum x world size)")
        per_epoch = self.steps_per_epoch * self.grad_accum
        epoch, skip = divmod(step * self.grad_accum, per_epoch)
        while True:
            keys = self._epoch_keys(epoch)
            plan = [keys[i:i + self.micro_batch]
                    for i in range(skip * self.micro_batch, per_epoch * self.micro_batch,
                                   self.micro_batch)]
            loader = DataLoader(self.dataset, batch_sampler=plan, num_workers=self.workers,
                                pin_memory=self.pin_memory)
            for batch in loader:
                yield epoch, batch
            epoch, skip = epoch + 1, 0


def distill_data(images, tensor_input: bool, image_size: int, mean, std, seed: int,
                 min_crop: float, micro_batch: int, grad_accum: int, world_size: int,
                 rank: int, workers: int, pin_memory: bool = False,
                 augment: str = "crop") -> DistillData:
    """Seeded crops of `images` (a (N, C, H, W) tensor in [0, 1] when `tensor_input`, else
    PIL images such as an ImageFolder) in micro-batches for this rank."""
    tf = train_transform(image_size, min_crop, mean, std, tensor_input, augment)
    # Images already in memory need no decoding: worker processes would only add start-up
    # time at every epoch.
    return DistillData(SeededCrops(images, tf), micro_batch, grad_accum, world_size, rank,
                       seed, 0 if tensor_input else workers, pin_memory)
