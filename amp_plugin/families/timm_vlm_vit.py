"""The vision encoders of vision-language models in timm, Qwen3-VL (`qwen3_vit_*`) and
DeepSeek (`deepseek_vit_*`): an encoder whose blocks take one RoPE table per forward, on
tokens flattened from a (B, H, W, C) patch grid, optionally followed by the VLM's projector
(`merger` / `aligner`), bare (`*_enc`) or inside a classifier. Block MLPs are timm `Mlp`
(Qwen3) or a packed-gate `GluMlp` (DeepSeek); a projector's MLP belongs to the head and is
kept whole. A bare encoder's embedding is the mean of its output tokens.

Registered here: adapter `timm_vlm_vit`.
"""

from __future__ import annotations

import torch

from ..core.adapter import register_adapter
from .timm_vit import TimmEncoderTower, tiny_timm

# the projector after the blocks, by encoder attribute name
PROJECTORS = ("merger", "aligner")


class TimmVlmViT(TimmEncoderTower):
    family = "timm_vlm_vit"
    example = tiny_timm("qwen3_vit_88m", patch_size=8, pos_embed_grid_size=4)

    def matches(self, model):
        from timm.models import deepseek_vit, qwen3_vit

        return isinstance(model, (qwen3_vit.Qwen3VitClassifier, qwen3_vit.Qwen3VitEncoder,
                                  deepseek_vit.DeepseekVitClassifier,
                                  deepseek_vit.DeepseekVitEncoder))

    def _projector(self, tower):
        enc = self._encoder(tower)
        return next((p for a in PROJECTORS if (p := getattr(enc, a, None))), None)

    def head_modules(self, tower):
        return [m for m in (self._projector(tower),) if m is not None]

    def embed(self, tower, x):
        enc = self._encoder(tower)
        x = enc.patch_embed(x)
        grid = x.shape[1:3]
        x, rope = enc._pos_embed(x)
        return (x, rope, grid)

    def run_block(self, tower, i, state):
        x, rope, grid = state
        return (self.blocks(tower)[i](x, rope=rope), rope, grid)

    def head(self, tower, state):
        # the rest of the encoder's forward after its blocks, then the classifier's pre-logits
        enc, (x, _, (h, w)) = self._encoder(tower), state
        x = getattr(enc, "norm", torch.nn.Identity())(x).reshape(len(x), h, w, -1)
        projector = self._projector(tower)
        x = projector(x) if projector is not None else x
        return tower.forward_head(x, pre_logits=True) if enc is not tower \
            else x.flatten(1, -2).mean(dim=1)


register_adapter(TimmVlmViT(), first=False)
