"""`amp bench passes`: images/s and peak memory of the two passes AMP repeats at scale
(scoring and validation) on a full-size architecture, and the hours they imply."""

from __future__ import annotations

import time

import torch

from ..core.adapter import vision_tower
from ..core.importance import AMPImportance
from ..evaluate.throughput import device_name
from ..utils.tensors import resolve_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def bench_passes(spec: dict, image_size: int = 224, batch_size: int = 64, batches: int = 4,
                 dtype: str = "bf16", device: str = "auto", grad_checkpointing: bool = True,
                 inv_temperature: float = 15.0, calib_images: int = 1_281_167,
                 val_images: int = 49_920, max_steps: int = 6) -> dict:
    """Images/s and peak memory of the two passes AMP repeats at scale, on the full-size
    architecture with random weights: a scoring pass (forward + backward of the entropy,
    Taylor taps) and a validation pass (forward, no gradient); and what they imply for the
    authors' data (one pass over ImageNet-1k train, E_val over ImageNet-1k val per trial)."""
    from ..core.models import build_model
    from ..utils.tensors import resolve_dtype

    dev = resolve_device(device)
    dt = resolve_dtype(dtype)
    torch.manual_seed(0)
    with torch.device(dev):
        model = build_model(spec)
    model = model.to(dt).eval()
    tower, adapter = vision_tower(model)
    if grad_checkpointing:
        adapter.set_grad_checkpointing(tower, True)
    x = torch.randn(batch_size, 3, image_size, image_size, device=dev, dtype=dt)
    imp = AMPImportance(inv_temperature, show_progress=False)
    imp.accumulate(model, [x])  # warm-up (kernels, allocator)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    _sync(dev)
    t0 = time.perf_counter()
    imp.accumulate(model, [x] * batches)
    _sync(dev)
    score_s = time.perf_counter() - t0
    score_peak = _peak(dev)
    with torch.no_grad():
        adapter.features(tower, x)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(batches):
            adapter.features(tower, x)
        _sync(dev)
        val_s = time.perf_counter() - t0
        state = adapter.embed(tower, x[:1])[0]
    n_blocks = len(adapter.blocks(tower))
    score_ips = batches * batch_size / score_s
    val_ips = batches * batch_size / val_s
    reference_passes = 1 + max_steps * n_blocks
    cached_passes = 1 + max_steps * (n_blocks + 1) / 2  # a trial of block l runs L - l blocks
    return {
        "model": f"{spec['library']}:{spec['name']}", "device": device_name(dev),
        "dtype": dtype, "batch_size": batch_size, "batches": batches,
        "image_size": image_size, "grad_checkpointing": grad_checkpointing,
        "params": sum(p.numel() for p in tower.parameters()), "blocks": n_blocks,
        "score_images_per_s": score_ips, "score_peak_bytes": score_peak,
        "val_images_per_s": val_ips, "val_peak_bytes": _peak(dev),
        "state_bytes_per_image_per_block": state[0].numel() * state.element_size(),
        "imagenet": {
            "calib_images": calib_images, "val_images": val_images,
            "score_hours": calib_images / score_ips / 3600,
            "val_pass_seconds": val_images / val_ips,
            "search_hours_reference": reference_passes * val_images / val_ips / 3600,
            "search_hours_cached": cached_passes * val_images / val_ips / 3600,
        },
    }
