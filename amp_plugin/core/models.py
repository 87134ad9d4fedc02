"""Model construction from data: a `ModelSpec` names a library, an architecture and a
local weights file; `create_model` is the one place models are built.

Builders (one per library) and weight-layout converters (original DINOv2 / EVA-CLIP
checkpoints to timm / open_clip layouts) are registered by the family modules. Nothing is
ever downloaded: weights come from local files only.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer
from torch import nn

from ..utils.registry import Registry


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    library: str = Field(description="builder name: timm, open_clip, ...")
    name: str = Field(description="architecture name in that library")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="architecture overrides")
    weights: str | None = Field(default=None, description="local weights file")
    weights_format: str = Field(default="native", description="layout of the weights file")
    path: str | None = Field(default=None, description=(
        "local model folder, for libraries that read one (transformers: a folder written by "
        "save_pretrained, config.json and model.safetensors)"))

    @field_validator("path")
    @classmethod
    def _local(cls, value: str | None) -> str | None:
        # refused as written (a recipe's relative paths are made absolute afterwards)
        if value is not None and value.lower().startswith(HUB_PREFIXES):
            raise ValueError(f"{value!r} names a model hub or URL; models come from local "
                             "folders only")
        return value

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        # without a folder the dump is what it was before `path` existed, so fingerprints
        # of existing recipes and saved models stay the same
        data = handler(self)
        if data.get("path") is None:
            data.pop("path", None)
        return data


Builder = Callable[[ModelSpec], nn.Module]
Converter = Callable[[dict, nn.Module], dict]
FolderLoader = Callable[[ModelSpec], nn.Module]
Standalone = Callable[[ModelSpec, nn.Module], dict]
_BUILDERS: Registry[Builder] = Registry("model library", listing="known:")
_CONVERTERS: Registry[Converter] = Registry("weights_format", listing="known:")
_FOLDER_LOADERS: Registry[FolderLoader] = Registry("model folder loader")
_STANDALONE: Registry[Standalone] = Registry("standalone spec maker")


def register_builder(library: str, load_folder: FolderLoader | None = None,
                     standalone: Standalone | None = None, replace: bool = False):
    """Decorator registering `build(spec) -> nn.Module` (random init) for a library.

    `load_folder(spec)` builds the model with the weights of the spec's local folder
    (`spec.path`) for libraries that read one; `standalone(spec, model)` gives a spec
    that rebuilds `model`'s architecture without that folder (what `save_pruned` writes).
    A library registered twice is refused unless `replace` (e.g. to wrap a builder)."""
    def deco(fn: Builder) -> Builder:
        _BUILDERS.register(library, fn, replace)
        if load_folder is not None:
            _FOLDER_LOADERS.register(library, load_folder, replace)
        if standalone is not None:
            _STANDALONE.register(library, standalone, replace)
        return fn
    return deco


def register_converter(fmt: str):
    """Decorator registering `convert(state_dict, model) -> state_dict` for a layout."""
    return _CONVERTERS.decorator(fmt)


def list_builders() -> list[str]:
    return _BUILDERS.names()


def list_converters() -> list[str]:
    return _CONVERTERS.names()


def get_converter(fmt: str) -> Converter:
    if fmt not in _CONVERTERS:
        raise ValueError(_CONVERTERS.unknown(fmt, also=["native"]))
    return _CONVERTERS.get(fmt)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a local .safetensors or torch checkpoint (no arbitrary unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.weights: weights file not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"model.weights: {path} is empty")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors, zipfile and unpickler errors alike
        kind = "safetensors" if path.suffix == ".safetensors" else "torch (weights-only)"
        raise ValueError(f"model.weights: {path} is not a readable {kind} checkpoint: "
                         f"{str(e).splitlines()[0]}") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"model.weights: {path} holds no state dict of tensors")
    return sd


def load_weights(model: nn.Module, spec: ModelSpec) -> None:
    if spec.weights is None:
        return
    sd = read_state_dict(spec.weights)
    if spec.weights_format != "native":
        sd = get_converter(spec.weights_format)(sd, model)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} (model: {tuple(own[k].shape)})"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"model.weights: {spec.weights} does not fit {spec.library} "
                         f"{spec.name}: missing {missing[:4]} ({len(missing)}), unexpected "
                         f"{unexpected[:4]} ({len(unexpected)}), shape mismatches "
                         f"{shapes[:4]} ({len(shapes)})")
    model.load_state_dict(sd, strict=True)


# Arguments and values by which a library would fetch or unpickle something: weights come
# from local files through `load_weights` only, so a spec naming any of them is refused.
NETWORK_KEYS = ("pretrained", "checkpoint_path", "cache_dir", "hf_model_name",
                "hf_tokenizer_name", "pretrained_cfg", "pretrained_cfg_overlay")
HUB_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:", "http://", "https://", "file://")
# Keys by which a library would import code shipped with a checkpoint (transformers'
# `trust_remote_code`, a config's `auto_map`): only a library's own classes are built.
REMOTE_CODE_KEYS = ("trust_remote_code", "auto_map")


def plain_errors(value: Any, key: str) -> list[str]:
    """Where `value` is not plain JSON data (dicts with string keys, lists, scalars), or
    names a hub, a URL or a pretrained download."""
    if isinstance(value, dict):
        out = []
        for k, v in value.items():
            if not isinstance(k, str):
                out.append(f"{key}: key {k!r} is not a string")
                continue
            if any(k == n or k.endswith("_" + n) for n in NETWORK_KEYS) and v not in (
                    None, False, "", {}):
                out.append(f"{key}.{k}: {v!r} would load pretrained weights or reach a model "
                           "hub; weights come from local files only")
            if k in REMOTE_CODE_KEYS and v not in (None, False, "", {}):
                out.append(f"{key}.{k}: {v!r} would run code shipped with a checkpoint; only "
                           "the library's own classes are built")
            out += plain_errors(v, f"{key}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [e for i, v in enumerate(value) for e in plain_errors(v, f"{key}.{i}")]
    if isinstance(value, str):
        if value.lower().startswith(HUB_PREFIXES):
            return [f"{key}: {value!r} names a model hub or URL; weights come from local "
                    "files only"]
        return []
    if value is None or isinstance(value, (bool, int, float)):
        return []
    return [f"{key}: expected plain JSON data, got {type(value).__name__}"]


def spec_errors(spec: ModelSpec, check_folder: bool = True) -> list[str]:
    """What makes a spec unsafe to build, checked before anything is imported or called:
    an unregistered builder, a hub name, a pretrained flag, a value that is not plain
    data. (Builders check their own callables, e.g. timm's `act_layer`, by allow-list.)"""
    errors = []
    if spec.library not in _BUILDERS:
        errors.append(f"library: {_BUILDERS.unknown(spec.library)}")
    errors += plain_errors(spec.name, "name")
    errors += plain_errors(spec.kwargs, "kwargs")
    errors += _path_errors(spec, check_folder)
    return errors


def _path_errors(spec: ModelSpec, check_folder: bool = True) -> list[str]:
    """A model folder must be a local folder of a library that reads one; a hub id
    ("owner/name") or a URL is refused, never looked up."""
    if spec.path is None:
        return []
    errors = plain_errors(spec.path, "path")
    if errors:
        return errors
    if spec.library in _BUILDERS and spec.library not in _FOLDER_LOADERS:
        return [f"path: library {spec.library!r} reads no model folder (a weights file goes "
                "in weights)"]
    if check_folder and not Path(spec.path).expanduser().is_dir():
        return [f"path: {spec.path!r} is not a local folder (a model hub id or URL is "
                "refused: models come from local folders only)"]
    return []


def _checked(spec: ModelSpec | dict) -> ModelSpec:
    spec = spec if isinstance(spec, ModelSpec) else ModelSpec(**spec)
    errors = spec_errors(spec)
    if errors:
        raise ValueError("model spec refused: " + "; ".join(errors))
    return spec


def build_model(spec: ModelSpec | dict) -> nn.Module:
    """The spec's architecture with random weights (works under `torch.device('meta')`)."""
    spec = _checked(spec)
    model = _BUILDERS.get(spec.library)(spec)
    model.amp_spec = spec.model_dump()
    return model


def create_model(spec: ModelSpec | dict, load: bool = True) -> nn.Module:
    """Build the model a spec describes (random init), load its local weights, and
    remember the spec on the model (`model.amp_spec`) for `save_pruned`. A spec with a
    model folder (`path`) is built by its library's folder loader, weights included."""
    spec = _checked(spec)
    if load and spec.path is not None:
        model = _FOLDER_LOADERS.get(spec.library)(spec)
        model.amp_spec = spec.model_dump()
        return model
    model = build_model(spec)
    if load:
        load_weights(model, spec)
    return model


def standalone_spec(spec: ModelSpec | dict, model: nn.Module) -> dict:
    """A spec that rebuilds `model`'s architecture from plain data alone (no model
    folder): what a saved model's manifest holds."""
    spec = spec if isinstance(spec, ModelSpec) else ModelSpec(**spec)
    if spec.library in _STANDALONE:
        return _STANDALONE.get(spec.library)(spec, model)
    return spec.model_dump()
