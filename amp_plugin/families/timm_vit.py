"""timm's VisionTransformer family (also DINOv2 in the timm layout), and the timm pieces
every timm family shares: the `timm` builder and the matchers of timm's MLP layers
(`Mlp`, `GluMlp` with a packed gate, `SwiGLU`).

Registered here: adapter `timm_vit`, builder `timm`, MLP kinds `timm_mlp`,
`timm_glu_packed`, `timm_swiglu`, converter `dinov2` (Meta's original checkpoints).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..core.adapter import Adapter, register_adapter
from ..core.mlp import MLPView, norm_or_none, register_mlp_kind
from ..core.models import ModelSpec, register_builder, register_converter


def tiny_timm(name: str, **kwargs) -> dict:
    """A family's example spec: timm model `name` at 32x32, width 64, 2 blocks."""
    return {"library": "timm", "name": name, "kwargs": {
        "img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 4,
        "num_classes": 0, **kwargs}}


# ---- adapter -------------------------------------------------------------------------------
def timm_split_tokens(tower: nn.Module, t: torch.Tensor):
    """(pooled, patch tokens) of timm block outputs, before the final norm."""
    patch = t[:, tower.num_prefix_tokens:]
    pooled = t[:, 0] if tower.global_pool == "token" else patch.mean(dim=1)
    return pooled, patch


class TimmTower(Adapter):
    """What timm's ViT-like towers share: blocks, pre-logits head, own forward path."""

    def blocks(self, tower):
        return tower.blocks

    def head(self, tower, state):
        return tower.forward_head(tower.norm(state[0]), pre_logits=True)

    def head_modules(self, tower):
        pool = getattr(tower, "attn_pool", None)
        return [pool] if pool is not None else []

    def features(self, tower, x):
        # The model's own path (honours grad checkpointing); equal to the block-wise one.
        return tower.forward_head(tower.forward_features(x), pre_logits=True)

    def checkpointing(self, tower) -> bool:
        """Whether blocks run under activation checkpointing (asked for, and training)."""
        return bool(getattr(tower, "grad_checkpointing", False)) and torch.is_grad_enabled()

    def last_state(self, tower, x):
        """The state after the last block, each block under timm's activation checkpoint
        when the tower asked for it (as the model's own forward_features runs them)."""
        from timm.models._manipulate import checkpoint

        state, ckpt = self.embed(tower, x), self.checkpointing(tower)
        for i in range(len(self.blocks(tower))):
            state = (checkpoint(self.run_block, tower, i, state) if ckpt
                     else self.run_block(tower, i, state))
        return state


class TimmEncoderTower(TimmTower):
    """timm towers that are an `encoder`, bare or wrapped by a classifier (VLM vision
    encoders): blocks and checkpointing live on the encoder; a bare encoder's embedding is
    the mean of the tokens its own forward returns."""

    def _encoder(self, tower):
        return getattr(tower, "encoder", tower)

    def blocks(self, tower):
        return self._encoder(tower).blocks

    def checkpointing(self, tower):
        return super().checkpointing(self._encoder(tower))

    def set_grad_checkpointing(self, tower, enable=True):
        self._encoder(tower).set_grad_checkpointing(enable)

    def features(self, tower, x):
        # the model's own forward (its block loop honours grad checkpointing)
        if self._encoder(tower) is not tower:
            return super().features(tower, x)
        y = tower(x)
        return y if y.dim() == 2 else y.flatten(1, -2).mean(dim=1)

    def final_tokens(self, tower, x):
        tokens = self.last_state(tower, x)[0]
        return tokens.mean(dim=1), tokens


class TimmViT(TimmTower):
    """timm VisionTransformer (also DINOv2 checkpoints converted to the timm layout)."""

    family = "timm_vit"
    example = tiny_timm("vit_small_patch16_224")

    def matches(self, model):
        from timm.models.vision_transformer import VisionTransformer

        return isinstance(model, VisionTransformer)

    def embed(self, tower, x):
        x = tower.patch_embed(x)
        x = tower._pos_embed(x)
        x = tower.patch_drop(x)
        return (tower.norm_pre(x),)

    def final_tokens(self, tower, x):
        t = self.embed(tower, x)[0]
        # As forward_features runs the blocks, so that grad checkpointing applies.
        if tower.grad_checkpointing and torch.is_grad_enabled():
            from timm.models._manipulate import checkpoint_seq

            t = checkpoint_seq(tower.blocks, t)
        else:
            t = tower.blocks(t)
        return timm_split_tokens(tower, t)


register_adapter(TimmViT(), first=False)


class TimmSharedBiasTower(TimmTower):
    """timm towers whose blocks take one position bias computed once per forward
    (`block(x, **{bias_arg: bias})`): BEiT's shared relative position bias, the shared
    relative position MLP of relpos ViTs. The state carries the bias."""

    bias_arg = ""

    def _bias(self, tower):
        raise NotImplementedError

    def embed(self, tower, x):
        x = tower.patch_embed(x)
        x = torch.cat((tower.cls_token.expand(x.shape[0], -1, -1), x), dim=1) \
            if tower.cls_token is not None else x
        if getattr(tower, "pos_embed", None) is not None:
            x = x + tower.pos_embed
        x = tower.pos_drop(x) if hasattr(tower, "pos_drop") else x
        return (x, self._bias(tower))

    def run_block(self, tower, i, state):
        x, bias = state
        return (tower.blocks[i](x, **{self.bias_arg: bias}), bias)

    def final_tokens(self, tower, x):
        return timm_split_tokens(tower, self.last_state(tower, x)[0])


# ---- MLP layouts of timm.layers ------------------------------------------------------------
def _example(layer: str, **kwargs):
    def make(dim: int, hidden: int) -> nn.Module:
        import timm.layers

        return getattr(timm.layers, layer)(dim, hidden, **kwargs)
    return make


@register_mlp_kind("timm_mlp", example=_example("Mlp"))
def _timm_mlp(name: str, m: nn.Module) -> MLPView | None:
    from timm.layers import Mlp

    if isinstance(m, Mlp) and isinstance(m.fc1, nn.Linear) and isinstance(m.fc2, nn.Linear):
        return MLPView(name, m, [m.fc1], m.fc2, "timm_mlp", norm_or_none(m.norm))
    return None


@register_mlp_kind("timm_glu_packed",
                   example=lambda d, h: _example("GluMlp", act_layer=nn.SiLU)(d, 2 * h))
def _timm_glu(name: str, m: nn.Module) -> MLPView | None:
    from timm.layers import GluMlp

    if isinstance(m, GluMlp) and isinstance(m.fc1, nn.Linear):
        return MLPView(name, m, [m.fc1], m.fc2, "timm_glu_packed", norm_or_none(m.norm),
                       packed=True)
    return None


@register_mlp_kind("timm_swiglu", example=_example("SwiGLU", norm_layer=nn.LayerNorm))
def _timm_swiglu(name: str, m: nn.Module) -> MLPView | None:
    from timm.layers import SwiGLU

    if isinstance(m, SwiGLU):
        return MLPView(name, m, [m.fc1_g, m.fc1_x], m.fc2, "timm_swiglu", norm_or_none(m.norm))
    return None


# ---- builder -------------------------------------------------------------------------------
# timm arguments that take a class or function; in a spec they are dotted import paths
# ("timm.layers.GluMlp") so that specs stay plain data (YAML, JSON manifests). A spec may
# come from a file someone else wrote (a pruned model's manifest), so only nn.Module
# classes of these modules are accepted, checked before anything is imported.
CALLABLE_KWARGS = {"mlp_layer", "act_layer", "norm_layer", "block_fn", "embed_layer"}
CALLABLE_MODULES = ("torch.nn", "timm.layers", "timm.models.vision_transformer",
                    "timm.models.eva")


def resolve_callables(kwargs: dict) -> dict:
    import importlib

    out = dict(kwargs)
    for key in CALLABLE_KWARGS & out.keys():
        value = out[key]
        if not (isinstance(value, str) and "." in value):
            continue  # None, or a name timm resolves itself ("gelu")
        module, _, attr = value.rpartition(".")
        allowed = f"a module class of {', '.join(CALLABLE_MODULES)}"
        if module not in CALLABLE_MODULES:
            raise ValueError(f"kwargs.{key}: {value!r} is not allowed (expected {allowed})")
        obj = getattr(importlib.import_module(module), attr, None)
        if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
            raise ValueError(f"kwargs.{key}: {value!r} is not allowed (expected {allowed})")
        out[key] = obj
    return out


@register_builder("timm")
def build_timm(spec: ModelSpec) -> nn.Module:
    import timm

    return timm.create_model(spec.name, pretrained=False, **resolve_callables(spec.kwargs))


# ---- checkpoint converter ------------------------------------------------------------------
def strip_wrappers(sd: dict) -> dict:
    """The state dict inside training wrappers (`model`, `state_dict`, DDP's `module.`)."""
    for key in ("model_ema", "model", "module", "state_dict"):
        if isinstance(sd.get(key), dict):
            sd = sd[key]
    return {k.removeprefix("module."): v for k, v in sd.items()}


@register_converter("dinov2")
def dinov2_to_timm(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Meta's `dinov2_vit*14_pretrain.pth` (`blocks.N.mlp.w12` packed gate, `w3`,
    `ls1.gamma`, `mask_token`, a 37x37 position grid) -> timm `vit_*_patch14_dinov2`.
    timm's own filter does the renaming and resamples the position embedding."""
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    if not isinstance(model, VisionTransformer):
        raise TypeError(f"weights_format dinov2 loads into a timm VisionTransformer, "
                        f"not {type(model).__name__}")
    sd = strip_wrappers(sd)
    if not any(re.match(r"blocks\.\d+\.mlp\.w(12|3|1)\.", k) or ".ls1.gamma" in k for k in sd):
        raise ValueError("not an original DINOv2 checkpoint (no blocks.N.mlp.w12/w3 or "
                         "ls1.gamma keys); use weights_format: native for timm layouts")
    if any(re.match(r"blocks\.\d+\.\d+\.", k) for k in sd):
        # block_chunks > 0 checkpoints nest blocks as blocks.<chunk>.<index>
        sd = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in sd.items()}
    # timm recognises the original layout by its mask token (pre-training only, dropped)
    sd.setdefault("mask_token", torch.zeros(1, model.embed_dim))
    if "pos_embed" in sd and sd["pos_embed"].shape != model.pos_embed.shape:
        # resampled as DINOv2 does, so timm's filter finds the grid already the right size
        sd["pos_embed"] = dinov2_pos_embed(sd["pos_embed"], model.patch_embed.grid_size,
                                           model.num_prefix_tokens)
    return checkpoint_filter_fn(dict(sd), model)


def dinov2_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], num_prefix: int = 1,
                     offset: float = 0.1) -> torch.Tensor:
    """DINOv2's own resampling of its position grid (`interpolate_pos_encoding`, run at
    every forward there): bicubic, no antialias, scale factor (new + 0.1) / old, in
    float32. timm resamples to the target size with antialias, which is not the same
    function; at a fixed input size the per-forward result is this one tensor."""
    import torch.nn.functional as F

    prefix, patch = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    old = int(round(patch.shape[1] ** 0.5))
    if old * old != patch.shape[1]:
        raise ValueError(f"pos_embed: {patch.shape[1]} positions are not a square grid")
    g = patch.float().reshape(1, old, old, -1).permute(0, 3, 1, 2)
    scale = ((grid[0] + offset) / old, (grid[1] + offset) / old)
    g = F.interpolate(g, scale_factor=scale, mode="bicubic", antialias=False)
    if tuple(g.shape[-2:]) != tuple(grid):
        raise ValueError(f"pos_embed: resampling {old}x{old} gave {tuple(g.shape[-2:])}, "
                         f"expected {tuple(grid)}")
    patch = g.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(pos_embed.dtype)
    return torch.cat([prefix, patch], dim=1)
