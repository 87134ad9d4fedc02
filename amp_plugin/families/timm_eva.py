"""timm's Eva family (EVA02, EVA-CLIP trunks), BAAI's EVA-CLIP checkpoints, and the
EVA-CLIP-8B vision trunk that timm does not ship.

Registered here: adapter `timm_eva`, converter `eva_clip`, timm entrypoint
`eva_clip_8b_patch14_224` (the trunk the `EVA-CLIP-8B` open_clip config names).
"""

from __future__ import annotations

import re
from functools import partial
from typing import Any

import torch
from torch import nn

from ..core.adapter import register_adapter
from ..core.models import register_converter
from .timm_vit import TimmTower, strip_wrappers, timm_split_tokens, tiny_timm


class TimmEva(TimmTower):
    family = "timm_eva"
    example = tiny_timm("eva02_tiny_patch14_224")

    def matches(self, model):
        from timm.models.eva import Eva

        return isinstance(model, Eva)

    def embed(self, tower, x):
        x = tower.patch_embed(x)
        x, rope = tower._pos_embed(x)
        return (tower.norm_pre(x), rope)

    def run_block(self, tower, i, state):
        x, rope = state
        if getattr(tower, "rope_mixed", False) and rope is not None:
            return (tower.blocks[i](x, rope=rope[i]), rope)
        return (tower.blocks[i](x, rope=rope), rope)

    def final_tokens(self, tower, x):
        return timm_split_tokens(tower, self.last_state(tower, x)[0])


register_adapter(TimmEva(), first=False)


# ---- EVA-CLIP-8B trunk ---------------------------------------------------------------------
EVA_CLIP_8B_TRUNK = "eva_clip_8b_patch14_224"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _eva_clip_8b_args() -> dict[str, Any]:
    """The released architecture (EVA-CLIP-8B.json and BAAI's model code): 32 blocks,
    width 4096, 32 heads of 128, MLP 20480 with GELU, RMSNorm, one fused `attn.qkv`
    without bias, absolute position embedding, class-token pooling and a linear head
    (without bias, set by the entrypoint) to the 1280-d joint embedding."""
    from timm.layers import RmsNorm

    return dict(
        img_size=224, patch_size=14, embed_dim=4096, depth=32, num_heads=32,
        mlp_ratio=20480 / 4096, qkv_bias=False, qkv_fused=True,
        norm_layer=partial(RmsNorm, eps=1e-6), use_rot_pos_emb=False, use_post_norm=False,
        global_pool="token", num_classes=1280,
    )


def _bias_free_head(model: nn.Module) -> None:
    """EVA-CLIP-8B's projection has no bias; timm's Eva always builds its head with one."""
    from timm.layers import trunc_normal_

    head = model.head
    if isinstance(head, nn.Linear) and head.bias is not None:
        model.head = nn.Linear(head.in_features, head.out_features, bias=False,
                               device=head.weight.device, dtype=head.weight.dtype)
        if model.head.weight.device.type != "meta":
            trunc_normal_(model.head.weight, std=0.02)


def _register_eva_clip_8b() -> None:
    from timm.models import register_model
    from timm.models._builder import build_model_with_cfg
    from timm.models.eva import Eva, checkpoint_filter_fn

    def eva_clip_8b_patch14_224(pretrained: bool = False, **kwargs) -> Eva:
        """EVA-CLIP-8B vision tower (BAAI), timm Eva layout."""
        if pretrained:
            raise ValueError(f"{EVA_CLIP_8B_TRUNK}: no hub weights; load a local file "
                             "with weights_format: eva_clip")
        kwargs.pop("pretrained_cfg", None)
        kwargs.pop("pretrained_cfg_overlay", None)
        args = {**_eva_clip_8b_args(), **kwargs}
        model = build_model_with_cfg(
            Eva, EVA_CLIP_8B_TRUNK, pretrained=False, pretrained_filter_fn=checkpoint_filter_fn,
            pretrained_cfg=dict(architecture=EVA_CLIP_8B_TRUNK, num_classes=1280,
                                input_size=(3, 224, 224), mean=CLIP_MEAN, std=CLIP_STD,
                                first_conv="patch_embed.proj", classifier="head"),
            feature_cfg=dict(feature_cls="getter"), **args)
        _bias_free_head(model)
        return model

    eva_clip_8b_patch14_224.__module__ = __name__
    register_model(eva_clip_8b_patch14_224)


_register_eva_clip_8b()


# ---- BAAI checkpoints ----------------------------------------------------------------------
def _eva_trunk(model: nn.Module) -> tuple[nn.Module, str]:
    """(timm Eva, prefix of its keys in `model`'s state dict)."""
    from timm.models.eva import Eva

    if isinstance(model, Eva):
        return model, ""
    trunk = getattr(model, "trunk", None)
    if isinstance(trunk, Eva):
        return trunk, "trunk."
    visual = getattr(model, "visual", None)
    if isinstance(getattr(visual, "trunk", None), Eva):
        return visual.trunk, "visual.trunk."
    raise TypeError(f"weights_format eva_clip loads into a timm Eva tower (bare, open_clip "
                    f"TimmModel or CLIP with a timm trunk), not {type(model).__name__}")


def _qkv_layout(visual: dict[str, torch.Tensor], trunk: nn.Module) -> dict[str, torch.Tensor]:
    """q/k/v weights in the target's layout: BAAI checkpoints hold either separate
    `attn.{q,k,v}_proj` or one fused `attn.qkv`; stacked for a fused target, split
    (q, k, v order) for a separate one."""
    fused = any(k.endswith("attn.qkv.weight") for k in trunk.state_dict())
    out = {}
    for k, v in visual.items():
        sep = re.match(r"(.*attn\.)q_proj\.weight$", k)
        qkv = re.match(r"(.*attn\.)qkv\.weight$", k)
        if fused and sep:
            p = sep.group(1)
            out[p + "qkv.weight"] = torch.cat(
                [v, visual[p + "k_proj.weight"], visual[p + "v_proj.weight"]], dim=0)
        elif fused and re.match(r".*attn\.[kv]_proj\.weight$", k):
            continue
        elif not fused and qkv:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                out[f"{qkv.group(1)}{name}.weight"] = part
        else:
            out[k] = v
    return out


@register_converter("eva_clip")
def eva_clip_to_open_clip(sd: dict[str, torch.Tensor], model: nn.Module) -> dict:
    """BAAI EVA-CLIP checkpoints (`EVA02_CLIP_E_psz14_plus_s9B.pt`,
    `EVA_CLIP_8B_psz14_s9B.pt`: `visual.*` EVA tower with separate `q_proj/k_proj/v_proj`
    or one fused `qkv`, `q_bias/v_bias`, `rope.*` buffers; `text.*` open_clip-style text
    transformer; `logit_scale`) -> an open_clip model with a timm Eva trunk (`visual.trunk.*`), the
    bare open_clip vision tower (`trunk.*`), or a bare timm Eva."""
    from timm.models.eva import checkpoint_filter_fn

    sd = strip_wrappers(sd)
    if not any(k.startswith("visual.") for k in sd):
        sd = {f"visual.{k}": v for k, v in sd.items()}  # a vision-only BAAI checkpoint
    trunk, prefix = _eva_trunk(model)
    visual = {k.removeprefix("visual."): v for k, v in sd.items() if k.startswith("visual.")}
    if not any(".attn." in k and ("q_proj" in k or ".qkv." in k) for k in visual):
        raise ValueError("not an EVA-CLIP checkpoint: no visual.blocks.N.attn.q_proj/qkv keys")
    visual = _qkv_layout(visual, trunk)
    # timm's filter: q_bias/v_bias, sub-LN names, drops rope buffers, resamples pos/patch
    out = {prefix + k: v for k, v in checkpoint_filter_fn(visual, trunk).items()}
    if prefix == "visual.trunk.":
        target = model.state_dict()
        out.update({k: v for k, v in sd.items() if k.startswith("text.")
                    or (k in target and not k.startswith("visual."))})
        if "positional_embedding" in sd and "text.positional_embedding" in target:
            # EVA-CLIP 1.0 checkpoints keep the text tower at the top level
            from open_clip.model import convert_to_custom_text_state_dict

            out.update({k: v for k, v in convert_to_custom_text_state_dict(sd).items()
                        if k.startswith("text.")})
    return out
