"""Weight-layout converters: original checkpoints -> the timm / open_clip modules we build.

Registered in `amp_plugin.models.CONVERTERS` and chosen by a spec's `weights_format`:

- `dinov2`: Meta's `dinov2_vit*14_pretrain.pth` (`blocks.N.mlp.w12` packed gate, `w3`,
  `ls1.gamma`, `mask_token`, a 37x37 position grid) -> timm `vit_*_patch14_dinov2`.
  timm's own filter does the renaming and resamples the position embedding to the
  model's grid.
- `eva_clip`: BAAI EVA-CLIP checkpoints (`EVA02_CLIP_E_psz14_plus_s9B.pt`,
  `EVA_CLIP_8B_psz14_s9B.pt`: `visual.*` EVA tower with separate `q_proj/k_proj/v_proj`,
  `q_bias/v_bias`, `rope.*` buffers; `text.*` open_clip-style text transformer;
  `logit_scale`) -> an open_clip model with a timm Eva trunk (`visual.trunk.*`), the bare
  open_clip vision tower (`trunk.*`), or a bare timm Eva.
- `open_clip`: an open_clip checkpoint loaded into an image-only tower (keeps `visual.*`).

A converter returns a state dict with exactly the target's names; `load_weights` then
loads it and reports any missing or unexpected key.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .models import register_converter


def _strip_wrappers(sd: dict) -> dict:
    for key in ("model_ema", "model", "module", "state_dict"):
        if isinstance(sd.get(key), dict):
            sd = sd[key]
    return {k.removeprefix("module."): v for k, v in sd.items()}


@register_converter("dinov2")
def dinov2_to_timm(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    if not isinstance(model, VisionTransformer):
        raise TypeError(f"weights_format dinov2 loads into a timm VisionTransformer, "
                        f"not {type(model).__name__}")
    sd = _strip_wrappers(sd)
    if not any(re.match(r"blocks\.\d+\.mlp\.w(12|3|1)\.", k) or ".ls1.gamma" in k for k in sd):
        raise ValueError("not an original DINOv2 checkpoint (no blocks.N.mlp.w12/w3 or "
                         "ls1.gamma keys); use weights_format: native for timm layouts")
    if any(re.match(r"blocks\.\d+\.\d+\.", k) for k in sd):
        # block_chunks > 0 checkpoints nest blocks as blocks.<chunk>.<index>
        sd = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in sd.items()}
    # timm recognises the original layout by its mask token (pre-training only, dropped)
    sd.setdefault("mask_token", torch.zeros(1, model.embed_dim))
    return checkpoint_filter_fn(dict(sd), model)


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


def _fuse_qkv(visual: dict[str, torch.Tensor], trunk: nn.Module) -> dict[str, torch.Tensor]:
    """BAAI towers keep q/k/v apart; a target with one fused `qkv` gets them stacked."""
    fused = any(k.endswith("attn.qkv.weight") for k in trunk.state_dict())
    if not fused:
        return visual
    out = {}
    for k, v in visual.items():
        m = re.match(r"(.*attn\.)q_proj\.weight$", k)
        if m:
            p = m.group(1)
            out[p + "qkv.weight"] = torch.cat(
                [v, visual[p + "k_proj.weight"], visual[p + "v_proj.weight"]], dim=0)
        elif not re.match(r".*attn\.[kv]_proj\.weight$", k):
            out[k] = v
    return out


@register_converter("eva_clip")
def eva_clip_to_open_clip(sd: dict[str, torch.Tensor], model: nn.Module) -> dict:
    from timm.models.eva import checkpoint_filter_fn

    sd = _strip_wrappers(sd)
    if not any(k.startswith("visual.") for k in sd):
        sd = {f"visual.{k}": v for k, v in sd.items()}  # a vision-only BAAI checkpoint
    trunk, prefix = _eva_trunk(model)
    visual = {k.removeprefix("visual."): v for k, v in sd.items() if k.startswith("visual.")}
    if not any(".attn." in k and ("q_proj" in k or ".qkv." in k) for k in visual):
        raise ValueError("not an EVA-CLIP checkpoint: no visual.blocks.N.attn.q_proj/qkv keys")
    visual = _fuse_qkv(visual, trunk)
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


@register_converter("open_clip")
def open_clip_visual(sd: dict[str, torch.Tensor], model: nn.Module) -> dict:
    """An open_clip CLIP checkpoint into an image-only tower (`visual.*` keys kept)."""
    sd = _strip_wrappers(sd)
    if hasattr(model, "visual"):
        return sd
    return {k.removeprefix("visual."): v for k, v in sd.items() if k.startswith("visual.")}
