"""Saving and loading pruned models: safetensors weights plus a JSON manifest.

Loading never unpickles: the architecture is rebuilt from the manifest's model spec,
every parameter whose saved shape differs is resized (Torch-Pruning changed it), and
the weights are loaded strictly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..utils.io import atomic_dir
from .adapter import vision_tower
from .mlp import find_mlps
from .models import build_model
from .tp import mark_packed_gates

FORMAT = "amp-pruned/1"
WEIGHTS, MANIFEST = "model.safetensors", "amp.json"


def save_pruned(model: nn.Module, path: str | Path, spec: dict | None = None,
                meta: dict | None = None) -> Path:
    """Write `model` (pruned or not) to directory `path` atomically."""
    spec = spec or getattr(model, "amp_spec", None)
    if spec is None:
        raise ValueError("the model has no construction spec: build it with "
                         "amp_plugin.create_model or pass spec={library, name, kwargs}")
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # safetensors refuses tensors that share memory; keep one copy of each.
    seen: dict[int, str] = {}
    aliases = {}
    for k in list(tensors):
        ptr = tensors[k].data_ptr()
        if ptr in seen and tensors[k].numel():
            aliases[k] = seen[ptr]
            del tensors[k]
        else:
            seen[ptr] = k
    tower, _ = vision_tower(model)
    manifest = {
        "format": FORMAT,
        "spec": {**spec, "weights": None},
        "hidden_sizes": {n: v.hidden for n, v in find_mlps(tower).items()},
        "shapes": {k: list(v.shape) for k, v in model.state_dict().items()},
        "aliases": aliases,
        "meta": meta or {},
    }

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))

    return atomic_dir(path, fill)


def is_pruned_dir(path: str | Path) -> bool:
    """Whether `path` holds a model written by `save_pruned`."""
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    f = path / MANIFEST
    if not f.is_file():
        raise FileNotFoundError(f"not a pruned model directory (no {MANIFEST}): {path}")
    manifest = json.loads(f.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{f}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def resize_to(model: nn.Module, shapes: dict[str, list[int]]) -> None:
    """Give every parameter/buffer the saved shape, fixing the owning module's sizes."""
    current = dict(model.named_parameters())
    current.update(dict(model.named_buffers()))
    for key, shape in shapes.items():
        t = current.get(key)
        if t is None or list(t.shape) == shape:
            continue
        owner_name, _, attr = key.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        new = torch.empty(shape, dtype=t.dtype, device=t.device)
        if isinstance(t, nn.Parameter):
            setattr(owner, attr, nn.Parameter(new, requires_grad=t.requires_grad))
        else:
            owner.register_buffer(attr, new)
        if isinstance(owner, nn.Linear) and attr == "weight":
            owner.out_features, owner.in_features = shape
        elif hasattr(owner, "normalized_shape") and attr == "weight":
            owner.normalized_shape = tuple(shape)


def load_pruned(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model written by `save_pruned` (weights only, no pickle)."""
    path = Path(path)
    manifest = read_manifest(path)
    model = build_model(manifest["spec"])
    resize_to(model, manifest["shapes"])
    tensors = load_file(str(path / WEIGHTS))
    for alias, source in manifest.get("aliases", {}).items():
        tensors[alias] = tensors[source]
    model.load_state_dict(tensors, strict=True)
    model.amp_spec = manifest["spec"]
    mark_packed_gates(vision_tower(model)[0])  # ready for Torch-Pruning, as it was saved
    return model.to(device).eval()
