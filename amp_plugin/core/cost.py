"""Parameter and FLOP counts of a vision tower (torch.utils.flop_counter: 2 FLOPs per MAC,
attention matmuls included)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .adapter import vision_tower
from .mlp import find_mlps


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_mlp_params(model: nn.Module) -> int:
    tower, _ = vision_tower(model)
    return sum(v.num_params() for v in find_mlps(tower).values())


@torch.no_grad()
def count_flops(model: nn.Module, example_inputs: torch.Tensor) -> int:
    """FLOPs of one image through the features AMP measures (per image of the batch)."""
    tower, adapter = vision_tower(model)
    counter = FlopCounterMode(display=False)
    # FlopCounterMode's module tracker hooks every module input that requires grad; under
    # no_grad a view of a parameter (the latent query of an attention-pool head) requires
    # grad without a grad_fn and the tracker fails on it, so parameters are frozen here.
    frozen = [(p, p.requires_grad) for p in tower.parameters()]
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        with counter:
            adapter.features(tower, example_inputs)
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    return int(counter.get_total_flops() // max(example_inputs.shape[0], 1))
