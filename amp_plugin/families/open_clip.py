"""open_clip's family: CLIP / CustomTextCLIP models, their vision towers (open_clip's own
VisionTransformer or a timm trunk such as EVA02's), text tokenizers, and the model
configs that open_clip does not ship (`model_configs/*.json`, EVA-CLIP-8B).

Registered here: adapters `open_clip_vit`, `open_clip_timm`, `open_clip`; builder
`open_clip` (the one construction path of `amp run` and `amp plan`); MLP kind
`open_clip_mlp`; converter `open_clip`; open_clip model configs of `model_configs/`.

The builder merges a spec's `kwargs` *recursively* into the named config (open_clip's
own `**model_kwargs` replace whole sub-configs), passes `vision_cfg.timm_model_kwargs` to
a timm trunk (open_clip's TimmModel forwards no architecture arguments; used for
depth-reduced EVA towers), and with `image_only: true` keeps only the vision tower.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.adapter import Adapter, ImageText, get_adapter, register_adapter
from ..core.mlp import MLPView, norm_or_none, register_mlp_kind
from ..core.models import ModelSpec, register_builder, register_converter
from ..utils.io import deep_merge
from .timm_vit import strip_wrappers

MODEL_CONFIGS = Path(__file__).parent / "model_configs"


# ---- adapters ------------------------------------------------------------------------------
def open_clip_cast(model: nn.Module, device, dtype: torch.dtype) -> nn.Module:
    """open_clip's own low-precision mode (what `create_model(precision="bf16")` builds):
    LayerNorms keep float32 weights and compute in float32, the rest runs in `dtype`."""
    from open_clip.factory import _set_model_device_and_precision
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import LayerNorm, LayerNormFp32

    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype)
    if precision is None:
        return model.to(device, dtype)
    # open_clip picks LayerNormFp32 when it builds a model for low precision (cast_dtype);
    # this model was built once in float32, so its norms take that class now (same state).
    for m in model.modules():
        if type(m) is LayerNorm:
            m.__class__ = LayerNormFp32
    is_timm = isinstance(model, TimmModel) or isinstance(getattr(model, "visual", None),
                                                         TimmModel)
    _set_model_device_and_precision(model, device, precision, is_timm)
    return model


class OpenClipViT(Adapter):
    """open_clip VisionTransformer: features are the pooled embedding before `proj`."""

    family = "open_clip_vit"
    example = {"library": "open_clip", "name": "ViT-B-32", "kwargs": {
        "image_only": True, "embed_dim": 32, "vision_cfg": {
            "image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32}}}

    def matches(self, model):
        from open_clip.transformer import VisionTransformer

        return isinstance(model, VisionTransformer)

    def _check(self, tower):
        if not tower.transformer.batch_first:
            raise ValueError("open_clip towers with batch_first=False are not supported")

    def embed(self, tower, x):
        self._check(tower)
        return (tower._embeds(x),)

    def blocks(self, tower):
        return tower.transformer.resblocks

    def head(self, tower, state):
        return tower._pool(state[0])[0]

    def features(self, tower, x):
        self._check(tower)
        return tower._pool(tower.transformer(tower._embeds(x)))[0]

    def final_tokens(self, tower, x):
        t = tower.transformer(tower._embeds(x))
        return tower._global_pool(t)

    def project(self, tower, features):
        return features @ tower.proj if tower.proj is not None else features

    def cast(self, model, device, dtype):
        return open_clip_cast(model, device, dtype)


class OpenClipTimm(Adapter):
    """open_clip TimmModel (e.g. EVA02-E-14-plus): a timm trunk followed by a projection."""

    family = "open_clip_timm"
    example = {"library": "open_clip", "name": "EVA02-B-16", "kwargs": {
        "image_only": True, "embed_dim": 32, "vision_cfg": {
            "image_size": 32, "timm_model_kwargs": {
                "img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2,
                "num_heads": 4}}}}

    def matches(self, model):
        from open_clip.timm_model import TimmModel

        return isinstance(model, TimmModel)

    def _inner(self, tower):
        return get_adapter(tower.trunk)

    def embed(self, tower, x):
        return self._inner(tower).embed(tower.trunk, x)

    def blocks(self, tower):
        return self._inner(tower).blocks(tower.trunk)

    def run_block(self, tower, i, state):
        return self._inner(tower).run_block(tower.trunk, i, state)

    def head(self, tower, state):
        return self._inner(tower).head(tower.trunk, state)

    def head_modules(self, tower):
        return self._inner(tower).head_modules(tower.trunk)

    def features(self, tower, x):
        return self._inner(tower).features(tower.trunk, x)

    def final_tokens(self, tower, x):
        return self._inner(tower).final_tokens(tower.trunk, x)

    def project(self, tower, features):
        # open_clip uses the trunk's classifier as the projection when timm_proj is unset
        return tower.head(tower.trunk.get_classifier()(features))

    def cast(self, model, device, dtype):
        return open_clip_cast(model, device, dtype)


class OpenClipCLIP(Adapter):
    """A whole open_clip CLIP/CustomTextCLIP: AMP prunes and measures `model.visual`."""

    family = "open_clip"
    example = {"library": "open_clip", "name": "ViT-B-32", "kwargs": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2,
                       "head_width": 32},
        "text_cfg": {"context_length": 16, "width": 64, "heads": 2, "layers": 1}}}

    def matches(self, model):
        return hasattr(model, "visual") and hasattr(model, "encode_text")

    def tower(self, model):
        return model.visual

    def cast(self, model, device, dtype):
        return open_clip_cast(model, device, dtype)

    def image_text(self, model):
        return OpenClipImageText(model)


class OpenClipImageText(ImageText):
    """open_clip's own encode_image / encode_text, its bundled BPE tokenizer and its
    evaluation transform (nothing from the hub)."""

    def encode_image(self, images):
        return self.model.encode_image(images)

    def encode_text(self, tokens):
        return self.model.encode_text(tokens)

    def tokenizer(self):
        from open_clip.tokenizer import SimpleTokenizer

        spec = getattr(self.model, "amp_spec", None)
        if spec is None:
            raise ValueError("the CLIP model has no construction spec (build it with "
                             "amp_plugin.create_model)")
        text_cfg = model_config(spec["name"], spec.get("kwargs", {}))["text_cfg"]
        if text_cfg.get("hf_tokenizer_name"):
            raise ValueError(f"{spec['name']}: Hugging Face tokenizers need the hub; only "
                             "open_clip's bundled BPE tokenizer is supported")
        return SimpleTokenizer(context_length=text_cfg.get("context_length", 77),
                               **text_cfg.get("tokenizer_kwargs", {}))

    def transform(self):
        """open_clip's evaluation transform of the model (resize, crop, normalise)."""
        import open_clip
        from open_clip.transform import PreprocessCfg, image_transform_v2

        cfg = open_clip.get_model_preprocess_cfg(self.model)
        return image_transform_v2(PreprocessCfg(**cfg), is_train=False)


for _adapter in (OpenClipViT(), OpenClipTimm(), OpenClipCLIP()):
    register_adapter(_adapter, first=False)


def _example_mlp(dim: int, hidden: int) -> nn.Module:
    from open_clip.transformer import ResidualAttentionBlock

    return ResidualAttentionBlock(dim, 2, mlp_ratio=hidden / dim).mlp


@register_mlp_kind("open_clip_mlp", example=_example_mlp)
def _open_clip_mlp(name: str, m: nn.Module) -> MLPView | None:
    if isinstance(m, nn.Sequential) and hasattr(m, "c_fc") and hasattr(m, "c_proj"):
        return MLPView(name, m, [m.c_fc], m.c_proj, "open_clip_mlp",
                       norm_or_none(getattr(m, "ln", None)))
    return None


# ---- configs and the builder ---------------------------------------------------------------
def register_model_configs() -> None:
    """Make open_clip know the configs of `model_configs/` (open_clip's own mechanism)."""
    import open_clip

    if MODEL_CONFIGS not in getattr(open_clip.factory, "_MODEL_CONFIG_PATHS", []):
        open_clip.add_model_config(MODEL_CONFIGS)


register_model_configs()


def model_config(name: str, overrides: dict | None = None) -> dict[str, Any]:
    """The open_clip model config of `name` with `overrides` merged in recursively."""
    import open_clip

    base = open_clip.get_model_config(name)
    if base is None:
        raise ValueError(f"unknown open_clip model {name!r}: not in open_clip.list_models()")
    overrides = {k: v for k, v in (overrides or {}).items() if k != "image_only"}
    return deep_merge(base, overrides)


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


@register_builder("open_clip")
def build_open_clip(spec: ModelSpec) -> nn.Module:
    """An open_clip CLIP / CustomTextCLIP / CoCa of a config, random init, as
    open_clip.create_model builds it (class choice, preprocessing config); works on the
    meta device, so `amp plan` builds exactly what `amp run` builds."""
    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    cfg = model_config(spec.name, spec.kwargs)
    image_only = spec.kwargs.get("image_only", False)
    hf_text = bool(cfg.get("text_cfg", {}).get("hf_model_name"))
    if hf_text and not image_only:
        raise ValueError(f"{spec.name}: its text tower is a Hugging Face model, which needs "
                         "the hub; only open_clip's own text towers are supported (or "
                         "kwargs.image_only: true, the vision tower alone)")
    vision = cfg["vision_cfg"]
    trunk_kwargs = vision.pop("timm_model_kwargs", None)
    if trunk_kwargs:
        if not vision.get("timm_model_name"):
            raise ValueError(f"{spec.name}: vision_cfg.timm_model_kwargs needs a timm trunk "
                             "(vision_cfg.timm_model_name)")
        vision["timm_model_name"] = _timm_variant(vision["timm_model_name"], trunk_kwargs)
    if vision.get("timm_model_name"):
        vision["timm_model_pretrained"] = False  # weights come from local files only
    preprocess = cfg.pop("preprocess_cfg", {})
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in cfg["text_cfg"]
    if custom_text:
        cls = open_clip.CoCa if "multimodal_cfg" in cfg else open_clip.CustomTextCLIP
    else:
        cls = open_clip.CLIP
    if image_only and (cls is not open_clip.CoCa or hf_text):
        # the vision tower alone, built as CLIP / CustomTextCLIP build it first (same
        # random init; a CoCa builds its text tower first); no text tower, so Hugging Face
        # text configs need no hub
        from open_clip.model import _build_vision_tower

        model = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"],
                                    cfg.get("quick_gelu", False))
    else:
        model = cls(**cfg)
    pp = merge_preprocess_dict(asdict(PreprocessCfg()), preprocess)
    visual = getattr(model, "visual", model)
    pp["size"] = getattr(visual, "image_size", pp["size"])
    open_clip.set_model_preprocess_cfg(model, pp)
    return visual if image_only else model


# ---- checkpoint converter ------------------------------------------------------------------
@register_converter("open_clip")
def open_clip_visual(sd: dict[str, torch.Tensor], model: nn.Module) -> dict:
    """An open_clip CLIP checkpoint into an image-only tower (`visual.*` keys kept)."""
    sd = strip_wrappers(sd)
    if hasattr(model, "visual"):
        return sd
    return {k.removeprefix("visual."): v for k, v in sd.items() if k.startswith("visual.")}
