"""Throughput of a vision encoder: images per second through the features AMP measures
(the same computation `cost.count_flops` counts, so the gain can be set against the
FLOPs ratio, its ideal value)."""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from .adapters import vision_tower
from .progress import progress

DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def device_name(device: torch.device | str) -> str:
    """A human-readable name of the device, e.g. 'NVIDIA H100 80GB HBM3' or the CPU model
    with the number of threads torch uses."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu} ({torch.get_num_threads()} threads)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_throughput(model: nn.Module, batch_size: int = 64, image_size: int = 224,
                       dtype: str = "float32", device: str | torch.device | None = None,
                       warmup: int = 3, runs: int = 10, seed: int = 0,
                       show_progress: bool = True) -> dict:
    """Images/s of the vision tower on random images: `warmup` untimed batches, then the
    median over `runs` timed batches (each synchronised on CUDA).

    `dtype` bf16/fp16 runs under torch.autocast, so the model's weights are left as they
    are; the model is moved to `device` for the measurement and back afterwards.
    """
    if batch_size < 1 or runs < 1 or warmup < 0:
        raise ValueError(f"need batch_size >= 1, runs >= 1, warmup >= 0; got {batch_size}, "
                         f"{runs}, {warmup}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    tower, adapter = vision_tower(model)
    was_training = model.training
    model.to(device).eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, image_size, image_size, generator=g).to(device)
    autocast = torch.autocast(device.type, dtype=DTYPES[dtype], enabled=dtype != "float32")
    # Timed by hand rather than with torch.utils.benchmark.Timer: its blocked_autorange
    # picks its own number of runs and it pins CPU threads to 1 unless told otherwise.
    seconds = []
    try:
        with autocast:
            for i in progress(range(warmup + runs), "throughput", enabled=show_progress):
                _sync(device)
                t0 = time.perf_counter()
                adapter.features(tower, x)
                _sync(device)
                if i >= warmup:
                    seconds.append(time.perf_counter() - t0)
    finally:
        model.to(home).train(was_training)
    median = statistics.median(seconds)
    return {
        "images_per_s": batch_size / median,
        "seconds_per_batch": median,
        "runs_images_per_s": [batch_size / s for s in seconds],
        "batch_size": batch_size,
        "image_size": image_size,
        "dtype": dtype,
        "device": device_name(device),
        "warmup": warmup,
        "runs": runs,
    }
