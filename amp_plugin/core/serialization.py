"""Saving and loading pruned models: safetensors weights plus a JSON manifest.

Loading never unpickles: the architecture is rebuilt from the manifest's model spec,
every parameter whose saved shape differs is resized (Torch-Pruning changed it), and
the weights are loaded strictly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..utils.io import atomic_dir, read_json_object
from .adapter import vision_tower
from .mlp import find_mlps
from .models import ModelSpec, build_model, spec_errors, standalone_spec
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
    spec = standalone_spec(spec, model)  # rebuilt from the manifest alone, never a folder
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
        "spec": {**spec, "weights": None, "weights_format": "native"},  # its own file
        "hidden_sizes": {n: v.hidden for n, v in find_mlps(tower).items()},
        "shapes": {k: list(v.shape) for k, v in model.state_dict().items()},
        "aliases": aliases,
        "meta": meta or {},
    }

    text = json.dumps(manifest, indent=2)

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS))
        (tmp / MANIFEST).write_text(text)

    return atomic_dir(path, fill, needed=sum(t.nbytes for t in tensors.values()) + len(text))


def is_pruned_dir(path: str | Path) -> bool:
    """Whether `path` holds a model written by `save_pruned`."""
    return (Path(path) / MANIFEST).is_file()


def _manifest_errors(m: dict) -> list[str]:
    """Structure and safety of a manifest (plain data only; nothing is imported)."""
    if m.get("format") != FORMAT:
        return [f"format: {m.get('format')!r}, expected {FORMAT!r}"]
    errors = [f"{k}: missing" for k in ("spec", "shapes") if k not in m]
    spec = m.get("spec")
    if isinstance(spec, dict):
        try:
            parsed = ModelSpec(**spec)
        except ValidationError as e:
            errors += [f"spec.{'.'.join(map(str, err['loc']))}: {err['msg']}"
                       for err in e.errors()]
        else:
            if parsed.weights is not None or parsed.weights_format != "native":
                errors.append(f"spec.weights: {parsed.weights!r}: a saved model's weights are "
                              f"its own {WEIGHTS}; expected null")
            if parsed.path is not None:
                errors.append(f"spec.path: {parsed.path!r}: a saved model is rebuilt from its "
                              "manifest alone; expected null")
            errors += [f"spec.{e}" for e in spec_errors(parsed)]
    elif "spec" in m:
        errors.append(f"spec: expected an object, got {type(spec).__name__}")
    shapes = m.get("shapes", {})
    if not isinstance(shapes, dict) or not all(
            isinstance(v, list) and all(isinstance(d, int) and not isinstance(d, bool)
                                        and d >= 0 for d in v) for v in shapes.values()):
        errors.append("shapes: expected an object of lists of sizes")
    aliases = m.get("aliases", {})
    if not isinstance(aliases, dict) or not all(
            isinstance(v, str) for v in aliases.values()):
        errors.append("aliases: expected an object of parameter names")
    if not isinstance(m.get("meta", {}), dict):
        errors.append("meta: expected an object")
    return errors


def read_manifest(path: str | Path) -> dict:
    """The manifest of a saved model, checked to be plain, safe data (see `load_pruned`)."""
    path = Path(path)
    f = path / MANIFEST
    if not f.is_file():
        raise FileNotFoundError(f"not a pruned model directory (no {MANIFEST}): {path}")
    manifest = read_json_object(f)
    errors = _manifest_errors(manifest)
    if errors:
        raise ValueError(f"{f}: refused: " + "; ".join(errors))
    return manifest


def _weights_shapes(f: Path) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors header (the data is not read)."""
    try:
        with safe_open(str(f), "pt") as st:
            return {k: list(st.get_slice(k).get_shape()) for k in st.keys()}
    except FileNotFoundError:
        raise FileNotFoundError(f"{f}: missing") from None
    except Exception as e:  # safetensors raises its own error type for damaged files
        raise ValueError(f"{f}: not a readable safetensors file ({e})") from None


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
    stored = _weights_shapes(path / WEIGHTS)
    expected = {k: v for k, v in manifest["shapes"].items() if k not in manifest.get(
        "aliases", {})}
    if stored != expected:
        diff = sorted(k for k in set(stored) ^ set(expected)) or sorted(
            k for k in stored if stored[k] != expected[k])
        raise ValueError(f"{path / MANIFEST}: shapes do not match {WEIGHTS}: first "
                         f"differences at {diff[:4]}")
    try:  # the builder checks its own callables (allow-list) before importing any
        model = build_model(manifest["spec"])
    except ValueError as e:
        raise ValueError(f"{path / MANIFEST}: refused: spec.{e}") from None
    resize_to(model, manifest["shapes"])
    for view in find_mlps(model).values():
        view.sync()  # sizes a forward reads besides the shapes (a fused block's split)
    tensors = load_file(str(path / WEIGHTS))
    for alias, source in manifest.get("aliases", {}).items():
        if source not in tensors:
            raise ValueError(f"{path / MANIFEST}: aliases.{alias}: {source!r} is not in "
                             f"{WEIGHTS}")
        tensors[alias] = tensors[source]
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: the weights do not fit the manifest's model ({e})") from None
    model.amp_spec = manifest["spec"]
    mark_packed_gates(vision_tower(model)[0])  # ready for Torch-Pruning, as it was saved
    return model.to(device).eval()
