"""The module distillation trains: a vision tower up to its final norm."""

from __future__ import annotations

import torch
from torch import nn

from ..core.adapter import Adapter


class TokenModel(nn.Module):
    """A vision tower up to its final norm: what distillation trains."""

    def __init__(self, tower: nn.Module, adapter: Adapter):
        super().__init__()
        self.tower = tower
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.adapter.final_tokens(self.tower, x)

    def register_external_parameters(self) -> None:
        """ZeRO-3 gathers a module's own parameters when its forward runs, but adapters
        read some (class token, position embedding) without calling their owner; those of
        every non-leaf module are registered with this wrapper, whose forward spans all."""
        from deepspeed.runtime.zero import register_external_parameter

        for module in self.tower.modules():
            if next(module.children(), None) is None:
                continue
            for p in module.parameters(recurse=False):
                register_external_parameter(self, p)


def untrained_parameters(tower: nn.Module, adapter: Adapter, x: torch.Tensor) -> list[str]:
    """Tower parameters the distillation loss cannot reach (final norm, head, projection),
    found by one backward pass so that no family needs a list of them."""
    named = list(tower.named_parameters())
    flags = [p.requires_grad for _, p in named]
    try:
        for _, p in named:
            p.requires_grad_(True)
        with torch.enable_grad():
            pooled, patch = adapter.final_tokens(tower, x)
            grads = torch.autograd.grad(pooled.float().sum() + patch.float().sum(),
                                        [p for _, p in named], allow_unused=True)
    finally:
        for (_, p), flag in zip(named, flags):
            p.requires_grad_(flag)
    return [n for (n, _), g in zip(named, grads) if g is None]
