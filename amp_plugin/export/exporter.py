"""`export_model`: a vision tower to a file that runs without amp, checked first.

The export is traced on a batch of two, its batch dimension left dynamic; the file is
then loaded with its own runtime (onnxruntime, `torch.export.load`) and run on real images
in two batch sizes, and kept only if its embeddings match the PyTorch model's. The
preprocessing the model expects is recorded in the file (where the format has room for
it) and in a JSON file beside it (`<file>.json`).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data import digits_raw, to_model_input
from ..utils.io import temp_dir_beside, write_json
from .base import INPUT, OUTPUT, get_format
from .encoder import Encoder


class ExportMismatch(ValueError):
    """The exported file's outputs differ from the PyTorch model's beyond the tolerance."""


def sidecar_path(path: str | Path) -> Path:
    """The JSON written beside an export: preprocessing, shapes, the check's numbers."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def preprocessing(image_size: int, mean, std) -> dict:
    """What a caller does to an RGB image before the exported model sees it, checked."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size: expected a positive integer, got {image_size!r}")
    for key, v in (("mean", mean), ("std", std)):
        if len(v) != 3 or not all(isinstance(c, (int, float)) for c in v):
            raise ValueError(f"{key}: expected three numbers (R, G, B), got {v!r}")
    if any(c <= 0 for c in std):
        raise ValueError(f"std: every value must be > 0, got {std!r}")
    return {"image_size": image_size, "mean": [float(c) for c in mean],
            "std": [float(c) for c in std], "layout": "NCHW float32 RGB",
            "normalise": "pixel values scaled to [0, 1], then (x - mean) / std",
            "resize": "image_size x image_size (resize the shorter side, centre crop)"}


def digit_batch(n: int, image_size: int, mean, std) -> torch.Tensor:
    """`n` scikit-learn digits as model input: real images when a run has none to give."""
    raw, _ = digits_raw()
    return to_model_input(raw[:n], image_size, mean, std)


def _check_images(images: torch.Tensor, size: int) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images)
        raise ValueError(f"images: expected a (N, 3, {size}, {size}) tensor, got {shape}")
    if tuple(images.shape[2:]) != (size, size) or len(images) < 1:
        raise ValueError(f"images: expected (N >= 1, 3, {size}, {size}) to match "
                         f"preprocessing image_size {size}, got {tuple(images.shape)}")
    return images.detach().float().cpu().contiguous()


def _cpu_float(model: nn.Module) -> nn.Module:
    """`model` itself when it is on the CPU in float32, else a float32 CPU copy."""
    if all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters()):
        return model
    return copy.deepcopy(model).cpu().float()


def export_model(model: nn.Module, path: str | Path, format: str = "onnx",
                 images: torch.Tensor | None = None, *, image_size: int | None = None,
                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), project: bool = True,
                 atol: float = 1e-4, rtol: float = 1e-4, source: dict | None = None) -> dict:
    """Export the vision tower of `model` (pruned or not) to `path` in `format` ("onnx",
    "torch-export"), float32, batch dimension dynamic; returns what is written beside it.

    `images` (N, 3, S, S), normalised, are the real images the export is checked on
    (default: 8 digits at `image_size`); the file is written (atomically) only if the
    runtime's embeddings match the PyTorch model's within `atol` + `rtol` * |expected|,
    else ExportMismatch. `project`: CLIP towers' features in the joint image-text space.
    """
    fmt = get_format(format)
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"path: {path} is a folder; expected a file name, e.g. "
                         f"{path / ('model' + fmt.suffix)}")
    if atol < 0 or rtol < 0:
        raise ValueError(f"atol, rtol: expected >= 0, got {atol}, {rtol}")
    if image_size is None:
        image_size = images.shape[-1] if isinstance(images, torch.Tensor) else 224
    prep = preprocessing(image_size, mean, std)
    images = _check_images(digit_batch(8, image_size, mean, std) if images is None else images,
                           image_size)
    was_training = model.training
    encoder = Encoder(_cpu_float(model), project).eval()  # refuses models AMP cannot read
    try:
        with torch.no_grad():
            expected = {len(images): encoder(images).numpy(), 1: encoder(images[:1]).numpy()}
        example = images[:2] if len(images) >= 2 else images.repeat(2, 1, 1, 1)
        meta = {**{k: json.dumps(v) for k, v in prep.items()}, "input": INPUT,
                "output": OUTPUT, "source": json.dumps(source or {})}
        tmp = temp_dir_beside(path)
        try:
            out = tmp / path.name
            with torch.no_grad():
                info = fmt.export(encoder, example, out, meta)
            run = fmt.load(out)
            worst, bound = 0.0, 0.0
            for n, want in expected.items():
                got = run(images[:n].numpy())
                if got.shape != want.shape or not np.isfinite(got).all():
                    raise ExportMismatch(f"{format} export of {path.name}: batch of {n} gave "
                                         f"shape {got.shape}, expected {want.shape} (finite)")
                err = np.abs(got - want)
                worst = max(worst, float(err.max()))
                excess = err - (atol + rtol * np.abs(want))
                bound = max(bound, float(excess.max()))
            if bound > 0:
                raise ExportMismatch(
                    f"{format} export of {path.name}: outputs differ from the PyTorch model "
                    f"by up to {worst:.3g} (atol {atol:g}, rtol {rtol:g}); nothing written")
            record = {
                "format": format, "file": path.name,
                "files": [p.name for p in fmt.files(out)],
                "input": {"name": INPUT, "shape": ["batch", 3, image_size, image_size],
                          "dtype": "float32"},
                "output": {"name": OUTPUT, "shape": ["batch", int(expected[1].shape[-1])],
                           "dtype": "float32", "projected": project},
                "preprocessing": prep,
                "check": {"images": len(images), "batch_sizes": sorted(expected),
                          "max_abs_diff": worst, "atol": atol, "rtol": rtol},
                "source": source or {}, **info,
            }
            write_json(sidecar_path(path), record)
            for f in fmt.files(out):  # the main file last: once it is there, all is
                os.replace(f, path.with_name(f.name))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        model.train(was_training)
    return record
