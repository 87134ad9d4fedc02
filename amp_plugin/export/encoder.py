"""The module that is exported: a vision tower from images to its embedding.

The graph holds no amp code: the adapter's `features` (and `project`, for CLIP towers) are
traced into plain torch operations, so the exported file runs wherever its runtime does.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.adapter import vision_tower


class Encoder(nn.Module):
    """`pixel_values` (N, 3, S, S), normalised -> `embedding` (N, D): the pooled features
    AMP measures, mapped into the joint image-text space when `project` (CLIP towers)."""

    def __init__(self, model: nn.Module, project: bool = True):
        super().__init__()
        self.tower, self._adapter = vision_tower(model)
        self.project = project

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        f = self._adapter.features(self.tower, pixel_values)
        return self._adapter.project(self.tower, f) if self.project else f
