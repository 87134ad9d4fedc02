"""Saving and loading pruned models: safetensors weights plus a JSON manifest.

Loading never unpickles: the architecture is rebuilt from the manifest's model spec,
every parameter whose saved shape differs is resized (Torch-Pruning changed it), and
the weights are loaded strictly.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .adapters import vision_tower
from .mlp import find_mlps
from .models import create_model

FORMAT = "amp-pruned/1"
WEIGHTS, MANIFEST = "model.safetensors", "amp.json"


def _atomic_dir(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))


def _replace_dir(tmp: Path, path: Path) -> None:
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


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
    tmp = _atomic_dir(path)
    try:
        save_file(tensors, str(tmp / WEIGHTS))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


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
    model = create_model(manifest["spec"], load=False)
    resize_to(model, manifest["shapes"])
    tensors = load_file(str(path / WEIGHTS))
    for alias, source in manifest.get("aliases", {}).items():
        tensors[alias] = tensors[source]
    model.load_state_dict(tensors, strict=True)
    model.amp_spec = manifest["spec"]
    find_mlps(vision_tower(model)[0])  # re-mark packed gates for Torch-Pruning
    return model.to(device).eval()
