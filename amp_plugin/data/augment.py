"""Random augmentations made reproducible: DINOv2's augmentation, crop + flip, and a dataset
wrapper that draws each image's augmentation under its own seed.

The authors feed DINOv2 its DINO augmentation for calibration AND validation (their draws
are not seeded, so their E_val moves from trial to trial). Here image i is augmented
under the seed (run seed, i): every pass over the validation images, in any order, with
any number of loader workers, sees the same pixels, so E_val is the same at every trial.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

# RandomSolarize's threshold: DINOv2's 128 on 8-bit images, the same level on [0, 1] tensors
SOLARIZE_8BIT = 128


def dino_augmentation(image_size: int, min_crop: float, mean, std, tensor_input: bool = False):
    """DINOv2's global-crop augmentation (the one the authors use for DINOv2): random
    resized crop (scale min_crop..1, bicubic) and horizontal flip; colour jitter
    (0.4, 0.4, 0.2, 0.1) with p 0.8; grayscale p 0.2; Gaussian blur (kernel 9, sigma
    0.1..2) p 0.1; solarize p 0.2; then normalisation. PIL images, or (C, H, W) tensors
    in [0, 1] with `tensor_input`."""
    from torchvision import transforms as T

    solarize = SOLARIZE_8BIT / 255 if tensor_input else SOLARIZE_8BIT
    steps = [
        T.RandomResizedCrop(image_size, scale=(min_crop, 1.0),
                            interpolation=T.InterpolationMode.BICUBIC, antialias=True),
        T.RandomHorizontalFlip(p=0.5),
        T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)],
                      p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(kernel_size=9, sigma=(0.1, 2.0))], p=0.1),
        T.RandomSolarize(threshold=solarize, p=0.2),
    ]
    if not tensor_input:
        steps.append(T.ToTensor())
    return T.Compose([*steps, T.Normalize(mean, std)])


def crop_flip(image_size: int, min_crop: float, mean, std, tensor_input: bool = False,
              flip: bool = True):
    """RandomResizedCrop (scale min_crop..1, bicubic), optionally a horizontal flip: the
    authors' CLIP/EVA distillation augmentation."""
    from torchvision import transforms as T

    steps = [T.RandomResizedCrop(image_size, scale=(min_crop, 1.0),
                                 interpolation=T.InterpolationMode.BICUBIC, antialias=True)]
    if flip:
        steps.append(T.RandomHorizontalFlip(p=0.5))
    if not tensor_input:
        steps.append(T.ToTensor())
    return T.Compose([*steps, T.Normalize(mean, std)])


def augmentation(name: str, image_size: int, min_crop: float, mean, std,
                 tensor_input: bool = False):
    """A named training/calibration augmentation: crop, crop_flip or dino."""
    if name == "dino":
        return dino_augmentation(image_size, min_crop, mean, std, tensor_input)
    if name in ("crop", "crop_flip"):
        return crop_flip(image_size, min_crop, mean, std, tensor_input, flip=name == "crop_flip")
    raise ValueError(f"unknown augmentation {name!r}; expected crop, crop_flip or dino")


def seeded_draw(transform, image, seed: int):
    """`transform(image)` with torch's generator seeded by `seed` (torchvision's random
    transforms draw from it); the caller's random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(image)


class SeededAugment(Dataset):
    """Item i of `dataset` (an (image, label) dataset without a transform, e.g. an
    ImageFolder or a Subset of one) augmented under a seed made of (seed, i): the same
    pixels whenever item i is read."""

    def __init__(self, dataset: Dataset, transform, seed: int):
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        # torch's CPU generator keeps only 32 bits of a seed: mix the set's seed in below that
        draw_seed = (self.seed * 0x9E3779B1 + index) & 0xFFFFFFFF
        return seeded_draw(self.transform, image, draw_seed), label
