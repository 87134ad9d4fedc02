"""timm's NaFlexViT (`naflexvit_*`) fed plain image batches (fixed resolution): its
embedding returns the patch tokens with optional RoPE embeddings and attention mask that
every block takes; some variants pool with an attention-pool (MAP) head.

Registered here: adapter `timm_naflex`. Batches of variable-size patch sequences
(`patch_coord`, `patch_valid`) are not what AMP feeds; it measures image batches.
"""

from __future__ import annotations

from ..core.adapter import register_adapter
from .timm_vit import TimmTower, timm_split_tokens, tiny_timm


class TimmNaFlex(TimmTower):
    family = "timm_naflex"
    example = tiny_timm("naflexvit_base_patch16_gap")

    def matches(self, model):
        from timm.models.naflexvit import NaFlexVit

        return isinstance(model, NaFlexVit)

    def embed(self, tower, x):
        embeds = tower._forward_embeds(x, patch_coord=None, patch_valid=None, attn_mask=None)
        return (embeds["patches"], embeds.get("rope_embeds"), embeds.get("attn_mask"))

    def run_block(self, tower, i, state):
        x, rope, mask = state
        kwargs = {"attn_mask": mask}
        if rope is not None:
            kwargs["rope"] = rope[i] if tower.rope_is_mixed else rope
        return (tower.blocks[i](x, **kwargs), rope, mask)

    def final_tokens(self, tower, x):
        return timm_split_tokens(tower, self.last_state(tower, x)[0])


register_adapter(TimmNaFlex(), first=False)
