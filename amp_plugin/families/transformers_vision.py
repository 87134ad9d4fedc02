"""Hugging Face transformers vision encoders: CLIP (`CLIPVisionModel`, the vision tower of
`CLIPModel`), SigLIP (`SiglipVisionModel`, its attention-pool head kept whole like
timm's; the vision tower of `SiglipModel`), DINOv2 (`Dinov2Model`, also the SwiGLU MLP of
the giant model) and `ViTModel`.

Models come from a local folder written by `save_pretrained` (`path`: config.json and
model.safetensors), read strictly offline, or from a config with random weights
(`kwargs`: config overrides; `kwargs.config`: a whole config dict). Only the classes
listed in `CLASSES` are built; a config naming code of its own (`auto_map`) or a
`trust_remote_code` anywhere in a spec is refused before transformers is imported.

A pruned model is saved in amp's format: the manifest holds the whole transformers config
(`kwargs.config`, one `intermediate_size` or `mlp_ratio` for all layers) and every layer's
hidden size is in the tensor shapes; `load_pruned` builds from the config, resizes each
MLP to its saved size and loads strictly.

CLIPModel and SiglipModel have their text tower too: zero-shot evaluation and caption
criteria run it with the tokenizer of the model's folder (`transformers_text`).

Registered here: adapters `hf_clip_vision`, `hf_clip`, `hf_siglip_vision`, `hf_siglip`,
`hf_dinov2`, `hf_vit`; builder `transformers`; MLP kinds `hf_mlp` (fc1/fc2 MLPs) and
`hf_swiglu` (DINOv2's SwiGLU FFN).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.adapter import Adapter, register_adapter
from ..core.mlp import MLPView, register_mlp_kind
from ..core.models import ModelSpec, plain_errors, register_builder
from ..utils.io import deep_merge, read_json_object
from .transformers_text import HFClipImageText, HFSiglipImageText

# the classes this family builds: {class name: model_type of its config}
CLASSES = {
    "CLIPVisionModel": "clip_vision_model",
    "CLIPModel": "clip",
    "SiglipVisionModel": "siglip_vision_model",
    "SiglipModel": "siglip",
    "Dinov2Model": "dinov2",
    "ViTModel": "vit",
}
CONFIG, WEIGHTS, SHARDS = "config.json", "model.safetensors", "model.safetensors.index.json"
# parameters a checkpoint may lack because AMP never runs them (ViT's tanh pooler, absent
# from checkpoints of ViTForImageClassification); everything else must be in the folder
UNUSED = {"ViTModel": ("pooler.",)}

TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "image_size": 32, "patch_size": 8}


def tiny_spec(name: str, **config: Any) -> dict:
    """A family's example spec: transformers class `name` at 32x32, width 64, 2 layers."""
    return {"library": "transformers", "name": name, "kwargs": {**TINY, **config}}


# ---- adapters ------------------------------------------------------------------------------
class HFTower(Adapter):
    """What the transformers encoders share: a ModuleList of layers that take
    (hidden_states, attention_mask), run here without a mask (every token attends)."""

    cls_name = ""

    def matches(self, model):
        return _is_class(model, self.cls_name)

    def run_block(self, tower, i, state):
        return (self.blocks(tower)[i](state[0], None), *state[1:])

    def last_tokens(self, tower, x):
        state = self.embed(tower, x)
        for i in range(len(self.blocks(tower))):
            state = self.run_block(tower, i, state)
        return state[0]

    def set_grad_checkpointing(self, tower, enable=True):
        if enable:
            tower.gradient_checkpointing_enable({"use_reentrant": False})
        else:
            tower.gradient_checkpointing_disable()


class HFClipVision(HFTower):
    """CLIPVisionModel: features are `pooler_output` (the class token after
    `post_layernorm`); in a CLIPModel, `project` applies its `visual_projection`
    (`image_embeds`) when the criterion compares images with text."""

    family = "hf_clip_vision"
    cls_name = "CLIPVisionModel"
    example = tiny_spec(cls_name, intermediate_size=128)

    def embed(self, tower, x):
        return (tower.pre_layrnorm(tower.embeddings(x)),)

    def blocks(self, tower):
        return tower.encoder.layers

    def head(self, tower, state):
        return tower.post_layernorm(state[0][:, 0])

    def features(self, tower, x):
        return tower(pixel_values=x).pooler_output

    def final_tokens(self, tower, x):
        t = self.last_tokens(tower, x)
        return t[:, 0], t[:, 1:]

    def project(self, tower, features):
        proj = tower.__dict__.get(PROJECTION)
        return proj(features) if proj is not None else features


# the CLIPModel's visual_projection, linked from its vision tower (a plain attribute: not a
# submodule, so the tower's parameters and state dict are unchanged)
PROJECTION = "_amp_visual_projection"


class HFClip(Adapter):
    """A whole CLIPModel: AMP prunes and measures `vision_model`."""

    family = "hf_clip"
    example = {"library": "transformers", "name": "CLIPModel", "kwargs": {
        "projection_dim": 32,
        "vision_config": {**TINY, "intermediate_size": 128},
        "text_config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                        "intermediate_size": 64, "max_position_embeddings": 16,
                        "vocab_size": 64, "bos_token_id": 62, "eos_token_id": 63,
                        "pad_token_id": 1}}}

    def matches(self, model):
        return _is_class(model, "CLIPModel")

    def tower(self, model):
        vision = model.vision_model
        vision.__dict__[PROJECTION] = model.visual_projection
        return vision

    def image_text(self, model):
        return HFClipImageText(model)


class HFSiglipVision(HFTower):
    """SiglipVisionModel: features are `pooler_output`, the attention-pool head's output
    (its MLP kept whole unless asked for); without a head, the mean of the tokens after
    `post_layernorm`."""

    family = "hf_siglip_vision"
    cls_name = "SiglipVisionModel"
    example = tiny_spec(cls_name, intermediate_size=128)

    def embed(self, tower, x):
        return (tower.embeddings(x),)

    def blocks(self, tower):
        return tower.encoder.layers

    def head(self, tower, state):
        t = tower.post_layernorm(state[0])
        return tower.head(t) if tower.use_head else t.mean(dim=1)

    def head_modules(self, tower):
        return [tower.head] if tower.use_head else []

    def features(self, tower, x):
        out = tower(pixel_values=x)
        return out.pooler_output if tower.use_head else out.last_hidden_state.mean(dim=1)

    def final_tokens(self, tower, x):
        t = self.last_tokens(tower, x)
        return t.mean(dim=1), t


class HFSiglip(Adapter):
    """A whole SiglipModel: AMP prunes and measures `vision_model` (its pooled output is
    already in the space text features live in: SigLIP has no visual projection)."""

    family = "hf_siglip"
    example = {"library": "transformers", "name": "SiglipModel", "kwargs": {
        "vision_config": {**TINY, "intermediate_size": 128},
        "text_config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                        "intermediate_size": 64, "max_position_embeddings": 16,
                        "vocab_size": 64, "projection_size": 64, "pad_token_id": 1,
                        "bos_token_id": 62, "eos_token_id": 63}}}

    def matches(self, model):
        return _is_class(model, "SiglipModel")

    def tower(self, model):
        return model.vision_model

    def image_text(self, model):
        return HFSiglipImageText(model)


class HFClassToken(HFTower):
    """DINOv2 and ViT: features are the class token after the final `layernorm` (DINOv2's
    `pooler_output`; for ViT what its classifier reads, not the tanh pooler)."""

    def embed(self, tower, x):
        return (tower.embeddings(x),)

    def head(self, tower, state):
        return tower.layernorm(state[0])[:, 0]

    def features(self, tower, x):
        return tower(pixel_values=x).last_hidden_state[:, 0]

    def final_tokens(self, tower, x):
        t = self.last_tokens(tower, x)
        return t[:, 0], t[:, 1:]


class HFDinov2(HFClassToken):
    family = "hf_dinov2"
    cls_name = "Dinov2Model"
    example = tiny_spec(cls_name, mlp_ratio=2)

    def blocks(self, tower):
        return tower.encoder.layer


class HFViT(HFClassToken):
    family = "hf_vit"
    cls_name = "ViTModel"
    example = tiny_spec(cls_name, intermediate_size=128)

    def blocks(self, tower):
        return tower.layers


for _adapter in (HFClipVision(), HFClip(), HFSiglipVision(), HFSiglip(), HFDinov2(), HFViT()):
    register_adapter(_adapter, first=False)

# small models of every layout this family drives: each adapter's example, and DINOv2's
# SwiGLU variant (the giant model's MLP); `amp bench models` sweeps them
SMALL_MODELS = {
    **{a.example["name"]: a.example for a in (HFClipVision, HFClip, HFSiglipVision, HFSiglip,
                                              HFDinov2, HFViT)},
    "Dinov2Model-swiglu": tiny_spec("Dinov2Model", mlp_ratio=2, use_swiglu_ffn=True),
}


def _is_class(module: nn.Module, *names: str) -> bool:
    """Whether `module` is (derives from) one of transformers' classes `names`, checked
    without importing transformers (matchers run on every module of every model)."""
    return any(c.__module__.startswith("transformers.") and c.__name__ in names
               for c in type(module).__mro__)


# ---- MLP layouts ---------------------------------------------------------------------------
FC_MLPS = ("CLIPMLP", "SiglipMLP", "Dinov2MLP", "ViTMLP")


def _clip_mlp(dim: int, hidden: int) -> nn.Module:
    from transformers import CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPMLP

    return CLIPMLP(CLIPVisionConfig(hidden_size=dim, intermediate_size=hidden,
                                    num_attention_heads=1))


def _dinov2_swiglu(dim: int, hidden: int) -> nn.Module:
    from transformers import Dinov2Config
    from transformers.models.dinov2.modeling_dinov2 import Dinov2SwiGLUFFN

    # DINOv2 derives the SwiGLU width from mlp_ratio (2/3 of it, rounded up to 8s)
    ratio = next(r for r in range(1, 64) if _swiglu_width(dim, r) >= hidden)
    mlp = Dinov2SwiGLUFFN(Dinov2Config(hidden_size=dim, num_attention_heads=1, mlp_ratio=ratio,
                                       use_swiglu_ffn=True))
    if mlp.down_proj.in_features != hidden:
        raise ValueError(f"no DINOv2 SwiGLU of width {hidden} at dim {dim} (widths are "
                         "multiples of 8)")
    return mlp


def _swiglu_width(dim: int, ratio: int) -> int:
    return (int(int(dim * ratio) * 2 / 3) + 7) // 8 * 8


@register_mlp_kind("hf_mlp", example=_clip_mlp)
def _hf_mlp(name: str, m: nn.Module) -> MLPView | None:
    if _is_class(m, *FC_MLPS):
        return MLPView(name, m, [m.fc1], m.fc2, "hf_mlp")
    return None


@register_mlp_kind("hf_swiglu", example=_dinov2_swiglu)
def _hf_swiglu(name: str, m: nn.Module) -> MLPView | None:
    if not _is_class(m, "Dinov2SwiGLUFFN"):
        return None
    if hasattr(m, "weights_in"):  # older transformers: one packed linear (gate, value)
        return MLPView(name, m, [m.weights_in], m.weights_out, "hf_swiglu", packed=True)
    return MLPView(name, m, [m.gate_proj, m.up_proj], m.down_proj, "hf_swiglu")


# ---- builder -------------------------------------------------------------------------------
def _read_config(folder: Path) -> dict:
    f = folder / CONFIG
    if not f.is_file():
        raise ValueError(f"path: {folder} has no {CONFIG} (a folder written by "
                         "save_pretrained is expected)")
    return read_json_object(f, key="path")


def resolve(spec: ModelSpec) -> tuple[str, dict]:
    """(class name, config dict) of a spec, from plain data only: nothing is imported."""
    if spec.weights is not None:
        raise ValueError("weights: a transformers model reads its weights from its folder "
                         "(path), not from a weights file")
    overrides = {k: v for k, v in spec.kwargs.items() if k != "config"}
    given = spec.kwargs.get("config")
    if spec.path is not None and given is not None:
        raise ValueError("kwargs.config: give a config or a folder (path), not both")
    if given is not None and not isinstance(given, dict):
        raise ValueError(f"kwargs.config: expected an object, got {type(given).__name__}")
    where = f"{Path(spec.path) / CONFIG}" if spec.path is not None else "kwargs.config"
    cfg = _read_config(Path(spec.path).expanduser()) if spec.path is not None else given or {}
    errors = plain_errors(cfg, where)  # config.json is data from someone else too
    if errors:
        raise ValueError("; ".join(errors))
    cfg = deep_merge(cfg, overrides)
    name = spec.name
    if name == "auto":
        archs = [a for a in cfg.get("architectures") or [] if a in CLASSES]
        by_type = [c for c, t in CLASSES.items() if t == cfg.get("model_type")]
        if not (archs or by_type):
            raise ValueError(f"name: auto: {where} names no class AMP builds "
                             f"(architectures {cfg.get('architectures')}, model_type "
                             f"{cfg.get('model_type')!r}); known: {', '.join(CLASSES)}")
        name = (archs or by_type)[0]
    if name not in CLASSES:
        raise ValueError(f"name: {name!r} is not a transformers class AMP builds; known: "
                         f"auto, {', '.join(CLASSES)}")
    model_type = cfg.get("model_type", CLASSES[name])
    if model_type != CLASSES[name]:
        raise ValueError(f"name: {name} takes a {CLASSES[name]!r} config, but {where} is a "
                         f"{model_type!r} config")
    return name, cfg


def _config(name: str, cfg: dict):
    import transformers

    cls = getattr(transformers, name)
    cfg = {k: v for k, v in cfg.items() if k not in ("attn_implementation",
                                                    "_attn_implementation")}
    return cls, cls.config_class.from_dict(cfg)


def load_transformers(spec: ModelSpec) -> nn.Module:
    """The model of a save_pretrained folder with its weights, read offline (safetensors
    only, never pickle); every parameter AMP runs must be in the folder."""
    name, cfg = resolve(spec)
    folder = Path(spec.path).expanduser()
    if not (folder / WEIGHTS).is_file() and not (folder / SHARDS).is_file():
        found = sorted(p.name for p in folder.iterdir())[:8]
        raise ValueError(f"path: {folder} has no {WEIGHTS} or {SHARDS} (found {found}); "
                         "transformers weights are read from safetensors only")
    cls, config = _config(name, cfg)
    from transformers.utils import logging

    bars = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # amp reports its own progress
    try:
        model, info = cls.from_pretrained(
            str(folder), config=config, local_files_only=True, trust_remote_code=False,
            use_safetensors=True, dtype=torch.float32, attn_implementation="sdpa",
            output_loading_info=True)
    finally:
        if bars:
            logging.enable_progress_bar()
    missing = [k for k in info.get("missing_keys", ())
               if not k.startswith(UNUSED.get(name, ()))]
    mismatched = [str(k) for k in info.get("mismatched_keys", ())]
    if missing or mismatched:
        raise ValueError(f"path: the weights in {folder} do not fit {name} of its "
                         f"config: missing {sorted(missing)[:4]} ({len(missing)}), shape "
                         f"mismatches {mismatched[:4]} ({len(mismatched)})")
    return model.eval()


def standalone(spec: ModelSpec, model: nn.Module) -> dict:
    """The spec of `model`'s architecture with its whole config (no folder)."""
    cfg = json.loads(model.config.to_json_string(use_diff=False))
    for key in ("_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    return ModelSpec(library="transformers", name=type(model).__name__,
                     kwargs={"config": cfg}).model_dump()


@register_builder("transformers", load_folder=load_transformers, standalone=standalone)
def build_transformers(spec: ModelSpec) -> nn.Module:
    """A transformers model of the spec's config, random init (works on the meta device:
    `amp plan` reads only config.json)."""
    name, cfg = resolve(spec)
    cls, config = _config(name, cfg)
    return cls._from_config(config, attn_implementation="sdpa")
