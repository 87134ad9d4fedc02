"""timm's ConViT (`convit_*`): a ViT whose first `local_up_to_layer` blocks use gated
positional self-attention over the patch tokens alone; the class token joins before the
first ordinary block. Block MLPs are timm `Mlp`.

Registered here: adapter `timm_convit`.
"""

from __future__ import annotations

import torch

from ..core.adapter import register_adapter
from .timm_vit import TimmTower, tiny_timm


class TimmConViT(TimmTower):
    family = "timm_convit"
    example = tiny_timm("convit_tiny", local_up_to_layer=1)

    def matches(self, model):
        from timm.models.convit import ConVit

        return isinstance(model, ConVit)

    def embed(self, tower, x):
        x = tower.patch_embed(x)
        if tower.use_pos_embed:
            x = x + tower.pos_embed
        return (tower.pos_drop(x),)

    def run_block(self, tower, i, state):
        x = state[0]
        if i == tower.local_up_to_layer and tower.cls_token is not None:
            x = torch.cat((tower.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return (tower.blocks[i](x),)

    def head(self, tower, state):
        return tower.forward_head(tower.norm(state[0]), pre_logits=True)

    def final_tokens(self, tower, x):
        t = self.last_state(tower, x)[0]
        joined = tower.cls_token is not None and tower.local_up_to_layer < len(tower.blocks)
        patch = t[:, 1:] if joined else t
        return (t[:, 0] if joined and tower.global_pool == "token" else patch.mean(dim=1)), patch


register_adapter(TimmConViT(), first=False)
