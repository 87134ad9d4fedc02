"""timm's SAM image encoder (`samvit_*`): a plain ViT on a (B, H, W, C) token grid with
windowed attention in most blocks and a convolutional neck. The MLPs are timm `Mlp`; the
neck, which follows the last block, holds none.

Registered here: adapter `timm_sam`.
"""

from __future__ import annotations

import torch

from ..core.adapter import register_adapter
from .timm_vit import TimmTower, tiny_timm


class TimmSam(TimmTower):
    family = "timm_sam"
    example = tiny_timm("samvit_base_patch16", window_size=2, neck_chans=32)

    def matches(self, model):
        from timm.models.vision_transformer_sam import VisionTransformerSAM

        return isinstance(model, VisionTransformerSAM)

    def embed(self, tower, x):
        from timm.layers import resample_abs_pos_embed_nhwc

        x = tower.patch_embed(x)
        if tower.pos_embed is not None:
            x = x + resample_abs_pos_embed_nhwc(tower.pos_embed, x.shape[1:3])
        return (tower.norm_pre(tower.patch_drop(tower.pos_drop(x))),)

    def head(self, tower, state):
        return tower.forward_head(tower.neck(state[0].permute(0, 3, 1, 2)), pre_logits=True)

    def final_tokens(self, tower, x):
        from timm.models._manipulate import checkpoint_seq

        t = self.embed(tower, x)[0]
        ckpt = tower.grad_checkpointing and torch.is_grad_enabled()
        patch = (checkpoint_seq(tower.blocks, t) if ckpt else tower.blocks(t)).flatten(1, 2)
        return patch.mean(dim=1), patch


register_adapter(TimmSam(), first=False)
