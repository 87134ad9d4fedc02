"""What a distillation takes and where it writes; the error it refuses bad input with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


class DistillError(ValueError):
    """A distillation that cannot start; the message names the key or file."""


@dataclass(frozen=True)
class DistillPaths:
    """Where a distillation writes (the run directory decides the names)."""

    checkpoints: Path  # DeepSpeed checkpoints (`latest` names the newest complete one)
    log: Path          # one JSON line per optimizer step (rank 0)
    result: Path       # summary of the last invocation
    fingerprint: Path  # what the checkpoints were trained for
    distilled: Path    # the consolidated student (`load_pruned` reads it)


@dataclass
class TrainImages:
    """Training images: an indexable set (tensor (N, C, H, W) in [0, 1] when
    `tensor_input`, else PIL images such as an ImageFolder) and how to normalise them."""

    images: Any
    tensor_input: bool
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
