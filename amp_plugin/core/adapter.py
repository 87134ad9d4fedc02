"""Model-family adapters: how to get features out of a vision tower, block by block.

Each family module (`amp_plugin.families.*`) registers its adapters with
`register_adapter`; the search, importance and distillation code only call this protocol:

    tower(model)              the module holding the MLPs (e.g. `clip.visual`)
    embed(tower, x)           state entering block 0
    blocks(tower)             the transformer blocks, in order
    run_block(tower, i, st)   state after block i
    head(tower, st)           the pooled embedding AMP measures (docs/algorithm.md section 4)
    head_modules(tower)       modules that `head` runs (an attention-pool head with its
                              own MLP); their MLPs are kept whole unless asked for
    final_tokens(tower, x)    (pooled, patch tokens) before the final norm/projection
    project(tower, f)         pooled features in the joint image-text space (CLIP towers)
    image_text(model)         the image-text side of a model with a text tower (CLIP-style):
                              `ImageText`, what zero-shot evaluation and caption criteria run
    tokenizer(model)          the text tokenizer of a model with a text tower
    cast(model, device, dtype) the model on a device in a precision, as its library runs it

A state is a tuple whose first element is the token tensor (batch first); the other
elements (e.g. rotary embeddings) are per-batch constants.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

State = tuple


class ImageText:
    """Both towers of an image-text model, as zero-shot evaluation and caption criteria run
    them (clip-benchmark calls `encode_image` and `encode_text`). Each family with a text
    tower subclasses it in its own module, so evaluation code never asks which family a
    model is. Embeddings are unnormalised; the callers normalise, so a logit scale (or
    SigLIP's bias) does not change any ranking and is not applied."""

    def __init__(self, model: nn.Module):
        self.model = model

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(N, D) image embeddings in the space text embeddings live in."""
        raise NotImplementedError

    def encode_text(self, tokens) -> torch.Tensor:
        """(N, D) text embeddings of what `tokenizer()` returned for N texts."""
        raise NotImplementedError

    def tokenizer(self) -> Callable[[list[str]], Any]:
        """texts -> tokens (with `.to(device)`), from local files only; raises ValueError
        naming what is missing when the model does not say where its tokenizer is."""
        raise NotImplementedError

    def transform(self) -> Callable[[Any], torch.Tensor]:
        """The model's own evaluation preprocessing: a PIL image -> a (3, H, W) tensor."""
        raise NotImplementedError


class Adapter:
    family = "base"
    # a small model of the family (a ModelSpec dict, 32x32 input, random weights), built by
    # the contract tests that run every registered adapter through score, search and save
    example: dict | None = None

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

    def head_modules(self, tower: nn.Module) -> list[nn.Module]:
        """Modules of the pooling head that may hold an MLP (e.g. a MAP attention pool)."""
        return []

    def in_head(self, tower: nn.Module, module: nn.Module) -> bool:
        """Whether `module` belongs to the pooling head (not to a transformer block)."""
        return any(m is module for h in self.head_modules(tower) for m in h.modules())

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

    def image_text(self, model: nn.Module) -> ImageText:
        """The image-text side of a model with a text tower (TypeError for the others)."""
        raise TypeError(f"{type(model).__name__} ({self.family}) has no text tower")

    def tokenizer(self, model: nn.Module):
        """The tokenizer of the model's text tower (models with one only)."""
        return self.image_text(model).tokenizer()

    def set_grad_checkpointing(self, tower: nn.Module, enable: bool = True) -> None:
        tower.set_grad_checkpointing(enable)

    def cast(self, model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
        """`model` (whole, as the adapter matched it) on `device` in `dtype`, in place."""
        return model.to(device, dtype)


_ADAPTERS: list[Adapter] = []
# (dotted class name, why AMP cannot prune it): layouts that a family's adapter would match
# but whose MLP neurons are not in linears of their own
_UNSUPPORTED: dict[str, str] = {}


class UnsupportedModel(TypeError):
    """A model AMP refuses before any work; the message names the class and the reason."""


def register_adapter(adapter: Adapter, first: bool = True) -> Adapter:
    """Add a family adapter; `first` puts it ahead of the others (more specific wins)."""
    _ADAPTERS.insert(0 if first else len(_ADAPTERS), adapter)
    return adapter


def register_unsupported(qualified_name: str, reason: str) -> None:
    """Refuse towers containing a module of class `qualified_name` ("pkg.module.Class",
    subclasses included) with `reason`, e.g. a block whose MLP is fused with attention."""
    _UNSUPPORTED[qualified_name] = reason


def list_adapters() -> list[Adapter]:
    return list(_ADAPTERS)


def list_unsupported() -> dict[str, str]:
    return dict(_UNSUPPORTED)


def _families() -> str:
    return ", ".join(a.family for a in _ADAPTERS)


def _unsupported_reason(cls: type) -> str | None:
    """Why AMP refuses `cls` or a class it derives from (None: not refused by name)."""
    return next((r for c in cls.__mro__
                 if (r := _UNSUPPORTED.get(f"{c.__module__}.{c.__qualname__}"))), None)


def get_adapter(model: nn.Module) -> Adapter:
    for adapter in _ADAPTERS:
        if adapter.matches(model):
            return adapter
    cls = type(model)
    reason = _unsupported_reason(cls)
    raise UnsupportedModel(
        f"AMP cannot prune {cls.__module__}.{cls.__name__}: "
        + (reason if reason else "no adapter matches it")
        + f". AMP prunes the MLPs in the transformer blocks of the families {_families()}; "
        "CNNs, MLP-Mixers and hierarchical (windowed) transformers are not supported "
        "(register_adapter adds a family)."
    )


def _check_layout(tower: nn.Module, adapter: Adapter) -> None:
    adapter.blocks(tower)  # a wrapper's adapter resolves (and refuses) its trunk here
    if not _UNSUPPORTED:
        return
    for module in tower.modules():
        reason = _unsupported_reason(type(module))
        if reason is not None:
            raise UnsupportedModel(
                f"{type(tower).__name__} ({adapter.family}) is built from "
                f"{type(module).__name__} modules, a layout AMP does not support: {reason}")


def vision_tower(model: nn.Module) -> tuple[nn.Module, Adapter]:
    """The module AMP prunes and the adapter that drives it (unwraps CLIP models).
    Raises UnsupportedModel, naming the class and the reason, for a model AMP cannot
    prune (a CNN, an MLP-Mixer, a layout with fused MLPs)."""
    adapter = get_adapter(model)
    tower = adapter.tower(model)
    if tower is not model:
        return vision_tower(tower)
    _check_layout(tower, adapter)
    return tower, adapter
