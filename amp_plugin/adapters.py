"""Model-family adapters: how to get features out of a vision tower, block by block.

Each family (timm ViT, incl. the DINOv2 layout; timm Eva; open_clip ViT; open_clip
models with a timm trunk such as EVA02; full open_clip CLIP models) registers one
adapter in `ADAPTERS`. The search and the importance code only call the protocol:

    tower(model)              the module holding the MLPs (e.g. `clip.visual`)
    embed(tower, x)           state entering block 0
    blocks(tower)             the transformer blocks, in order
    run_block(tower, i, st)   state after block i
    head(tower, st)           the pooled embedding AMP measures (ALGORITHM.md section 4)
    final_tokens(tower, x)    (pooled, patch tokens) before the final norm/projection

A state is a tuple whose first element is the token tensor (batch first); the other
elements (e.g. rotary embeddings) are per-batch constants.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

State = tuple


class Adapter:
    family = "base"

    def matches(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def tower(self, model: nn.Module) -> nn.Module:
        return model

    def embed(self, tower: nn.Module, x: torch.Tensor) -> State:
        raise NotImplementedError

    def blocks(self, tower: nn.Module) -> Sequence[nn.Module]:
        raise NotImplementedError

    def run_block(self, tower: nn.Module, i: int, state: State) -> State:
        return (self.blocks(tower)[i](state[0]), *state[1:])

    def head(self, tower: nn.Module, state: State) -> torch.Tensor:
        raise NotImplementedError

    def features(self, tower: nn.Module, x: torch.Tensor) -> torch.Tensor:
        state = self.embed(tower, x)
        for i in range(len(self.blocks(tower))):
            state = self.run_block(tower, i, state)
        return self.head(tower, state)

    def final_tokens(self, tower: nn.Module, x: torch.Tensor):
        raise NotImplementedError

    def project(self, tower: nn.Module, features: torch.Tensor) -> torch.Tensor:
        """`head`'s features mapped into the space text features live in (CLIP towers);
        used only when a criterion compares images with text."""
        return features

    def set_grad_checkpointing(self, tower: nn.Module, enable: bool = True) -> None:
        tower.set_grad_checkpointing(enable)


def _timm_split_tokens(tower: nn.Module, t: torch.Tensor):
    """(pooled, patch tokens) of timm block outputs, before the final norm."""
    patch = t[:, tower.num_prefix_tokens:]
    pooled = t[:, 0] if tower.global_pool == "token" else patch.mean(dim=1)
    return pooled, patch


class _Timm(Adapter):
    """What timm's ViT-like towers share: blocks, pre-logits head, own forward path."""

    def blocks(self, tower):
        return tower.blocks

    def head(self, tower, state):
        return tower.forward_head(tower.norm(state[0]), pre_logits=True)

    def features(self, tower, x):
        # The model's own path (honours grad checkpointing); equal to the block-wise one.
        return tower.forward_head(tower.forward_features(x), pre_logits=True)


class TimmViT(_Timm):
    """timm VisionTransformer (also DINOv2 checkpoints converted to the timm layout)."""

    family = "timm_vit"

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
        return _timm_split_tokens(tower, t)


class TimmEva(_Timm):
    family = "timm_eva"

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
        from timm.models._manipulate import checkpoint

        state = self.embed(tower, x)
        ckpt = tower.grad_checkpointing and torch.is_grad_enabled()
        for i in range(len(tower.blocks)):
            state = (checkpoint(self.run_block, tower, i, state) if ckpt
                     else self.run_block(tower, i, state))
        return _timm_split_tokens(tower, state[0])


class OpenClipViT(Adapter):
    """open_clip VisionTransformer: features are the pooled embedding before `proj`."""

    family = "open_clip_vit"

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


class OpenClipTimm(Adapter):
    """open_clip TimmModel (e.g. EVA02-E-14-plus): a timm trunk followed by a projection."""

    family = "open_clip_timm"

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

    def features(self, tower, x):
        return self._inner(tower).features(tower.trunk, x)

    def final_tokens(self, tower, x):
        return self._inner(tower).final_tokens(tower.trunk, x)

    def project(self, tower, features):
        # open_clip uses the trunk's classifier as the projection when timm_proj is unset
        return tower.head(tower.trunk.get_classifier()(features))


class OpenClipCLIP(Adapter):
    """A whole open_clip CLIP/CustomTextCLIP: AMP prunes and measures `model.visual`."""

    family = "open_clip"

    def matches(self, model):
        return hasattr(model, "visual") and hasattr(model, "encode_text")

    def tower(self, model):
        return model.visual


ADAPTERS: list[Adapter] = [TimmViT(), TimmEva(), OpenClipViT(), OpenClipTimm(), OpenClipCLIP()]


def register_adapter(adapter: Adapter, first: bool = True) -> None:
    ADAPTERS.insert(0 if first else len(ADAPTERS), adapter)


def get_adapter(model: nn.Module) -> Adapter:
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    raise TypeError(
        f"no AMP adapter for {type(model).__module__}.{type(model).__name__}; "
        f"supported families: {', '.join(a.family for a in ADAPTERS)} (see register_adapter)"
    )


def vision_tower(model: nn.Module) -> tuple[nn.Module, Adapter]:
    """The module AMP prunes and the adapter that drives it (unwraps CLIP models)."""
    adapter = get_adapter(model)
    tower = adapter.tower(model)
    if tower is not model:
        return vision_tower(tower)
    return tower, adapter
