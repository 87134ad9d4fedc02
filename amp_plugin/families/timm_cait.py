"""timm's CaiT: self-attention blocks over the patch tokens, then class-attention blocks
(`blocks_token_only`) that update only the class token; both kinds hold a timm `Mlp`.

Registered here: adapter `timm_cait`. Its block list is the two stages in order; the
state is (patch tokens, class token or None before the class-attention stage).
"""

from __future__ import annotations

import torch

from ..core.adapter import register_adapter
from .timm_vit import TimmTower, tiny_timm


class TimmCait(TimmTower):
    family = "timm_cait"
    example = tiny_timm("cait_xxs24_224", depth_token_only=1)

    def matches(self, model):
        from timm.models.cait import Cait

        return isinstance(model, Cait)

    def blocks(self, tower):
        return [*tower.blocks, *(tower.blocks_token_only or [])]

    def embed(self, tower, x):
        return (tower.pos_drop(tower.patch_embed(x) + tower.pos_embed), None)

    def run_block(self, tower, i, state):
        x, cls = state
        if i < len(tower.blocks):
            return (tower.blocks[i](x), None)
        if cls is None:
            cls = tower.cls_token.expand(x.shape[0], -1, -1)
        return (x, tower.blocks_token_only[i - len(tower.blocks)](x, cls))

    def _tokens(self, state):
        x, cls = state
        return x if cls is None else torch.cat((cls, x), dim=1)

    def head(self, tower, state):
        return tower.forward_head(tower.norm(self._tokens(state)), pre_logits=True)

    def final_tokens(self, tower, x):
        x, cls = self.last_state(tower, x)
        pooled = cls[:, 0] if tower.global_pool == "token" and cls is not None \
            else x.mean(dim=1)
        return pooled, x


register_adapter(TimmCait(), first=False)
