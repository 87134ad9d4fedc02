"""The paper's models that timm / open_clip cannot build by name, and open_clip models
with nested overrides.

- `eva_clip_8b_patch14_224`: the EVA-CLIP-8B vision tower expressed with timm's `Eva`
  (32 blocks, width 4096, 32 heads of 128, MLP 20480 with GELU, RMSNorm, no q/k/v bias,
  separate q/k/v projections as in the released checkpoint, absolute position embedding,
  class-token pooling, a linear head to the 1280-d joint embedding). Registered as a timm
  entrypoint, so `timm.create_model("eva_clip_8b_patch14_224", depth=2)` works.
- `ZOO_CONFIGS["EVA-CLIP-8B"]`: the whole CLIP as an open_clip model config (that timm
  trunk plus open_clip's text transformer of EVA-CLIP-8B: 32 layers, width 1280).
- builder `zoo`: builds any open_clip config (ours or open_clip's built-ins) with
  `kwargs` merged *recursively* into it (open_clip's own `**model_kwargs` replace whole
  sub-configs), `vision_cfg.timm_model_kwargs` passed to a timm trunk (open_clip's
  TimmModel forwards no architecture arguments; used for depth-reduced EVA towers), and
  `image_only: true` to keep only the vision tower.
"""

from __future__ import annotations

import copy
from functools import partial
from typing import Any

from torch import nn

from .models import ModelSpec, register_builder

EVA_CLIP_8B_TRUNK = "eva_clip_8b_patch14_224"


def _eva_clip_8b_args() -> dict[str, Any]:
    from timm.layers import RmsNorm

    return dict(
        img_size=224, patch_size=14, embed_dim=4096, depth=32, num_heads=32,
        mlp_ratio=20480 / 4096, qkv_bias=False, qkv_fused=False, norm_layer=partial(
            RmsNorm, eps=1e-6),
        use_rot_pos_emb=False, use_post_norm=False, global_pool="token", num_classes=1280,
    )


def _register_timm_entrypoints() -> None:
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
        return build_model_with_cfg(
            Eva, EVA_CLIP_8B_TRUNK, pretrained=False, pretrained_filter_fn=checkpoint_filter_fn,
            pretrained_cfg=dict(architecture=EVA_CLIP_8B_TRUNK, num_classes=1280,
                                input_size=(3, 224, 224), mean=_CLIP_MEAN, std=_CLIP_STD,
                                first_conv="patch_embed.proj", classifier="head"),
            feature_cfg=dict(feature_cls="getter"), **args)

    eva_clip_8b_patch14_224.__module__ = __name__
    register_model(eva_clip_8b_patch14_224)


_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ZOO_CONFIGS: dict[str, dict[str, Any]] = {
    "EVA-CLIP-8B": {
        "embed_dim": 1280,
        "vision_cfg": {
            "image_size": 224,
            "timm_model_name": EVA_CLIP_8B_TRUNK,
            "timm_model_pretrained": False,
            "timm_pool": "token",
            "timm_proj": None,
        },
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1280, "heads": 20,
                     "layers": 32},
        "custom_text": True,
    },
}


def merge(base: dict, override: dict) -> dict:
    """`base` with `override` merged in recursively (dicts merge, other values replace)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def model_config(name: str, overrides: dict | None = None) -> dict[str, Any]:
    """The open_clip model config of `name` (zoo or open_clip built-in) with overrides."""
    import open_clip

    base = ZOO_CONFIGS.get(name) or open_clip.get_model_config(name)
    if base is None:
        raise ValueError(f"unknown model {name!r}: not in the zoo ({', '.join(ZOO_CONFIGS)}) "
                         "nor in open_clip.list_models()")
    return merge(base, overrides or {})


def _timm_variant(base: str, kwargs: dict[str, Any]) -> str:
    """Name of a timm entrypoint that builds `base` with architecture `kwargs`.

    open_clip's TimmModel calls timm.create_model(name) without architecture arguments,
    so a depth-reduced trunk needs its own registered name (deterministic, plain values).
    """
    import timm
    from timm.models import register_model

    for key, value in kwargs.items():
        if not isinstance(value, (int, float, bool, str)):
            raise ValueError(f"vision_cfg.timm_model_kwargs.{key}: expected a plain value, "
                             f"got {type(value).__name__}")
    suffix = "_".join(f"{k}{v}" for k, v in sorted(kwargs.items()))
    name = f"{base}__{suffix}".replace(".", "p").replace("-", "m")
    if not timm.is_model(name):
        def entrypoint(pretrained: bool = False, **kw):
            return timm.create_model(base, pretrained=pretrained, **{**kwargs, **kw})

        entrypoint.__name__ = name
        entrypoint.__module__ = __name__
        register_model(entrypoint)
    return name


def build_clip(name: str, overrides: dict | None = None) -> nn.Module:
    """An open_clip CLIP / CustomTextCLIP from a (zoo or built-in) config, random init."""
    import open_clip

    overrides = dict(overrides or {})
    image_only = overrides.pop("image_only", False)
    cfg = model_config(name, overrides)
    vision = cfg["vision_cfg"]
    trunk_kwargs = vision.pop("timm_model_kwargs", None)
    if trunk_kwargs:
        if not vision.get("timm_model_name"):
            raise ValueError(f"{name}: vision_cfg.timm_model_kwargs needs a timm trunk "
                             "(vision_cfg.timm_model_name)")
        vision["timm_model_name"] = _timm_variant(vision["timm_model_name"], trunk_kwargs)
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in cfg["text_cfg"]
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    model = cls(**cfg)
    return model.visual if image_only else model


@register_builder("zoo")
def _build_zoo(spec: ModelSpec) -> nn.Module:
    return build_clip(spec.name, spec.kwargs)


_register_timm_entrypoints()
