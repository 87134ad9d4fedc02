"""Data sources (registered: digits, imagefolder, coco), transforms, batches.

A new source is one module here with a `@register_source` class and one import below."""

from . import coco, digits, imagefolder  # noqa: F401  (each module registers itself)
from .augment import SeededAugment, augmentation, dino_augmentation
from .base import DataSource, Split, get_source, list_sources, register_source
from .digits import digits_raw, digits_splits
from .loader import amp_loader
from .transforms import batches, eval_transform, to_model_input

__all__ = ["DataSource", "SeededAugment", "Split", "amp_loader", "augmentation", "batches",
           "digits_raw", "digits_splits", "dino_augmentation", "eval_transform", "get_source",
           "list_sources", "register_source", "to_model_input"]
