"""timm's relative-position ViTs (`vit_relpos_*`, `vit_srelpos_*`): blocks take a shared
position bias, and each block's attention may hold a `RelPosMlp`, a small MLP from
relative coordinates to attention biases. That MLP is not a block MLP (it never sees the
tokens), so `find_mlps` does not look inside it.

Registered here: adapter `timm_relpos`, `RelPosMlp` as not a block MLP.
"""

from __future__ import annotations

from ..core.adapter import register_adapter
from ..core.mlp import register_not_mlp
from .timm_vit import TimmSharedBiasTower, tiny_timm


class TimmRelPos(TimmSharedBiasTower):
    family = "timm_relpos"
    bias_arg = "shared_rel_pos"
    example = tiny_timm("vit_relpos_small_patch16_224")

    def matches(self, model):
        from timm.models.vision_transformer_relpos import VisionTransformerRelPos

        return isinstance(model, VisionTransformerRelPos)

    def _bias(self, tower):
        return tower.shared_rel_pos.get_bias() if tower.shared_rel_pos is not None else None


register_adapter(TimmRelPos(), first=False)
register_not_mlp("timm.layers.pos_embed_rel.RelPosMlp")
