"""What the Python API takes as calibration and validation batches, checked before work.

A batch is a tensor of images (N, C, H, W) or an (images, extra) tuple; several batches
are a list, a loader or any iterable of them, and one tensor alone is one batch. The
entropy criteria compare each image with the other images of its batch, so a batch of one
image has a constant entropy (every score would be 0, every cut would pass): refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from ..utils.dist import world_size
from ..utils.tensors import split_batch

ONE_IMAGE = ("the entropy criteria compare each image with the others of its batch, so one "
             "image alone has a constant entropy; use batches of 2 or more images")


def as_batches(batches, arg: str) -> Iterable:
    """`batches` as an iterable of batches: a tensor is one batch."""
    if isinstance(batches, torch.Tensor):
        return [batches]
    if not isinstance(batches, Iterable):
        raise TypeError(f"{arg}: expected a list or an iterable of batches (tensors or "
                        f"(images, ...) tuples) or one tensor, got {type(batches).__name__}")
    return batches


def reiterable(batches, arg: str) -> Iterable:
    """Batches that can be read more than once (the search reads the validation batches at
    every trial): an iterator or generator is read into a list once; none at all is
    refused (an exhausted iterator, an empty list)."""
    batches = as_batches(batches, arg)
    if isinstance(batches, Iterator):
        batches = list(batches)
    if not len(batches):
        raise ValueError(f"{arg}: no batch (an empty list, or an iterator already read "
                         "to its end)")
    return batches


def batch_images(batch, index: int, arg: str) -> tuple[torch.Tensor, object]:
    """(images, extra) of batch `index` of `arg`, refusing a batch that is not a tensor of
    at least 2 images."""
    try:
        images, extra = split_batch(batch)
    except TypeError:
        raise TypeError(f"{arg}: batch {index} is a {type(batch).__name__}; expected a tensor "
                        "of images (N, C, H, W) or an (images, ...) tuple") from None
    if images.dim() < 2:
        raise ValueError(f"{arg}: batch {index} has shape {tuple(images.shape)}; expected "
                         "images (N, C, H, W)")
    if images.shape[0] * world_size() < 2:  # the criteria see the batch of every rank
        raise ValueError(f"{arg}: batch {index} holds {images.shape[0]} image; {ONE_IMAGE}")
    return images, extra


class SameShape:
    """Refuses a validation batch whose images differ in number or shape from the first:
    E_val is a mean over batches of an entropy that depends on the batch size, and the
    state cache is sized from the first batch."""

    def __init__(self, arg: str):
        self.arg, self.shape = arg, None

    def __call__(self, images: torch.Tensor, index: int) -> None:
        shape = tuple(images.shape)
        if self.shape is None:
            self.shape = shape
        elif shape != self.shape:
            raise ValueError(f"{self.arg}: batch {index} has shape {shape}, batch 0 "
                             f"{self.shape}; every validation batch must hold the same number "
                             "of images of one size (drop the last, incomplete batch)")


def check_val_batches(batches: Iterable, arg: str) -> None:
    """Every batch of a list (not a stream) holds 2 or more images of one shape."""
    same = SameShape(arg)
    for i, batch in enumerate(batches):
        images, _ = batch_images(batch, i, arg)
        same(images, i)
