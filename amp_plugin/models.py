"""Model construction from data: a `ModelSpec` names a library, an architecture and a
local weights file; `create_model` is the one place models are built.

Builders are registered per library in `BUILDERS`; weight-layout converters (original
DINOv2 / EVA-CLIP checkpoints to timm / open_clip layouts) in `CONVERTERS`. Nothing is
ever downloaded: weights come from local files only.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    library: str = Field(description="builder name: timm, open_clip, ...")
    name: str = Field(description="architecture name in that library")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="architecture overrides")
    weights: str | None = Field(default=None, description="local weights file")
    weights_format: str = Field(default="native", description="layout of the weights file")


Builder = Callable[[ModelSpec], nn.Module]
BUILDERS: dict[str, Builder] = {}
CONVERTERS: dict[str, Callable[[dict, nn.Module], dict]] = {}


def register_builder(library: str):
    def deco(fn: Builder) -> Builder:
        BUILDERS[library] = fn
        return fn
    return deco


def register_converter(fmt: str):
    def deco(fn):
        CONVERTERS[fmt] = fn
        return fn
    return deco


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a local .safetensors or torch checkpoint (no arbitrary unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return sd


def load_weights(model: nn.Module, spec: ModelSpec) -> None:
    if spec.weights is None:
        return
    sd = read_state_dict(spec.weights)
    if spec.weights_format != "native":
        if spec.weights_format not in CONVERTERS:
            raise ValueError(f"unknown weights_format {spec.weights_format!r}; "
                             f"known: native, {', '.join(CONVERTERS)}")
        sd = CONVERTERS[spec.weights_format](sd, model)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{spec.weights} does not fit {spec.name}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


# timm arguments that take a class or function; in a spec they are dotted import paths
# ("timm.layers.GluMlp") so that specs stay plain data (YAML, JSON manifests).
_CALLABLE_KWARGS = {"mlp_layer", "act_layer", "norm_layer", "block_fn", "embed_layer"}


def _resolve(kwargs: dict[str, Any]) -> dict[str, Any]:
    out = dict(kwargs)
    for key in _CALLABLE_KWARGS & out.keys():
        value = out[key]
        if isinstance(value, str) and "." in value:
            module, _, attr = value.rpartition(".")
            try:
                out[key] = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as e:
                raise ValueError(f"model kwargs.{key}: cannot import {value!r} ({e})") from e
    return out


@register_builder("timm")
def _build_timm(spec: ModelSpec) -> nn.Module:
    import timm

    return timm.create_model(spec.name, pretrained=False, **_resolve(spec.kwargs))


@register_builder("open_clip")
def _build_open_clip(spec: ModelSpec) -> nn.Module:
    import open_clip

    return open_clip.create_model(spec.name, pretrained=None, **spec.kwargs)


def create_model(spec: ModelSpec | dict, load: bool = True) -> nn.Module:
    """Build the model a spec describes (random init), load its local weights, and
    remember the spec on the model (`model.amp_spec`) for `save_pruned`."""
    spec = spec if isinstance(spec, ModelSpec) else ModelSpec(**spec)
    if spec.library not in BUILDERS:
        raise ValueError(f"unknown model library {spec.library!r}; known: {', '.join(BUILDERS)}")
    model = BUILDERS[spec.library](spec)
    if load:
        load_weights(model, spec)
    model.amp_spec = spec.model_dump()
    return model


from . import convert, zoo  # noqa: E402,F401  (fill BUILDERS / CONVERTERS)
