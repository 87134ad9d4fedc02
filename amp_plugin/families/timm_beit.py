"""timm's BEiT family (BEiT, BEiT v2): a shared relative position bias passed to every
block. The MLPs are timm `Mlp` (or `SwiGLU`), matched by `timm_vit`'s kinds.

Registered here: adapter `timm_beit`.
"""

from __future__ import annotations

from ..core.adapter import register_adapter
from .timm_vit import TimmSharedBiasTower


class TimmBeit(TimmSharedBiasTower):
    family = "timm_beit"
    bias_arg = "shared_rel_pos_bias"
    example = {"library": "timm", "name": "beitv2_base_patch16_224", "kwargs": {
        "img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 4,
        "num_classes": 0}}

    def matches(self, model):
        from timm.models.beit import Beit

        return isinstance(model, Beit)

    def _bias(self, tower):
        return tower.rel_pos_bias() if tower.rel_pos_bias is not None else None


register_adapter(TimmBeit(), first=False)
