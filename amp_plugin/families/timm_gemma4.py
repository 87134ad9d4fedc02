"""Gemma 4's vision encoder in timm (`gemma4_vit_*`): bare (`*_enc`, the VLM's soft-token
pooler as its head) or inside a classifier. Blocks take RoPE cos/sin tables (from the patch
positions) and an optional padding mask, all computed once per forward and carried in the
state; on image batches nothing is padded. The MLP is a gated MLP whose three projections
are `Gemma4ClippableLinear` wrappers (an `nn.Linear` plus optional clamps): the neurons are
the rows of `gate_proj` / `up_proj` and the columns of `down_proj`.

Registered here: adapter `timm_gemma4`, MLP kind `gemma4_gated`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.adapter import register_adapter
from ..core.mlp import MLPView, register_mlp_kind
from .timm_vit import TimmEncoderTower, tiny_timm


class TimmGemma4(TimmEncoderTower):
    family = "timm_gemma4"
    example = tiny_timm("gemma4_vit_167m", patch_size=8, num_kv_heads=4, head_dim=16)

    def matches(self, model):
        from timm.models.gemma4_vit import Gemma4VitClassifier, Gemma4VitEncoder

        return isinstance(model, (Gemma4VitClassifier, Gemma4VitEncoder))

    def head_modules(self, tower):
        pooler = getattr(self._encoder(tower), "pooler", None)
        return [pooler] if pooler is not None else []

    def embed(self, tower, x):
        # the encoder's `_encode` before its block loop
        enc = self._encoder(tower)
        x, position_ids, padding = enc.patch_embed(x)
        cos, sin = enc.rotary_emb(x, position_ids)
        mask = None
        if padding is not None and padding.any():
            mask = torch.zeros(x.shape[0], 1, 1, x.shape[1], device=x.device, dtype=x.dtype)
            mask.masked_fill_(padding[:, None, None, :], float("-inf"))
        return (x, cos, sin, mask, position_ids, padding)

    def run_block(self, tower, i, state):
        x, cos, sin, mask, *rest = state
        return (self.blocks(tower)[i](x, cos, sin, attn_mask=mask), cos, sin, mask, *rest)

    def _pool(self, enc, x, position_ids, padding):
        """The encoder's own pooling after its blocks (soft-token pooler, mean, or none)."""
        if enc.global_pool == "soft":
            x, _ = enc.pooler(x, position_ids, padding)
            return (x - enc.std_bias) * enc.std_scale if enc.std_bias is not None else x
        return x.mean(dim=1) if enc.global_pool == "avg" else x

    def head(self, tower, state):
        x, _, _, _, position_ids, padding = state
        enc = self._encoder(tower)
        x = self._pool(enc, x, position_ids, padding)
        if enc is not tower:
            return tower.forward_head(x, pre_logits=True)
        return x if x.dim() == 2 else x.mean(dim=1)


register_adapter(TimmGemma4(), first=False)


def _gemma4_mlp(dim: int, hidden: int) -> nn.Module:
    from timm.models.gemma4_vit import Gemma4GatedMlp

    return Gemma4GatedMlp(dim, hidden)


@register_mlp_kind("gemma4_gated", example=_gemma4_mlp)
def _gemma4_gated(name: str, m: nn.Module) -> MLPView | None:
    from timm.models.gemma4_vit import Gemma4GatedMlp

    if isinstance(m, Gemma4GatedMlp):
        return MLPView(name, m, [m.gate_proj.linear, m.up_proj.linear], m.down_proj.linear,
                       "gemma4_gated")
    return None
