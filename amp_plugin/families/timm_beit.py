"""timm's BEiT family (BEiT, BEiT v2): a shared relative position bias passed to every
block. The MLPs are timm `Mlp` (or `SwiGLU`), matched by `timm_vit`'s kinds.

Registered here: adapter `timm_beit`.
"""

from __future__ import annotations

from ..core.adapter import register_adapter
from .timm_vit import TimmSharedBiasTower, tiny_timm


class TimmBeit(TimmSharedBiasTower):
    family = "timm_beit"
    bias_arg = "shared_rel_pos_bias"
    example = tiny_timm("beitv2_base_patch16_224")

    def matches(self, model):
        from timm.models.beit import Beit

        return isinstance(model, Beit)

    def _bias(self, tower):
        return tower.rel_pos_bias() if tower.rel_pos_bias is not None else None


register_adapter(TimmBeit(), first=False)
