"""Throughput of a vision encoder (task `throughput`): images per second through the
features AMP measures (the same computation `core.cost.count_flops` counts, so the gain
can be set against the FLOPs ratio, its ideal value)."""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from ..core.adapter import vision_tower
from ..utils.progress import progress
from ..utils.tensors import DTYPES, resolve_device
from .base import ROLES, EvalTask, Row, register_task


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


@register_task
class Throughput(EvalTask):
    name = "throughput"
    order = 90

    def example(self, root):
        return {"throughput": {"batch_size": 4, "warmup": 1, "runs": 2, "device": "cpu"}}

    def run(self, model, role, cfg, ctx):
        t = cfg.throughput
        out = measure_throughput(model, t.batch_size, t.image_size or ctx.data.image_size,
                                 t.dtype, resolve_device(t.device), t.warmup, t.runs,
                                 show_progress=ctx.show_progress)
        ctx.log(f"{role}: {out['images_per_s']:.1f} images/s on {out['device']}")
        return out

    def finish(self, section, models):
        if "teacher" not in section:
            return
        base = section["teacher"]["images_per_s"]
        for role in models:
            if role != "teacher" and role in section:
                section[f"{role}_gain"] = {
                    "throughput": section[role]["images_per_s"] / base,
                    "flops": models["teacher"]["flops"] / max(models[role]["flops"], 1),
                }

    def rows(self, section):
        roles = [r for r in ROLES if r in section]
        if not roles:
            return []
        gain = section.get("pruned_gain")
        note = f"x{gain['throughput']:.2f} (FLOPs x{gain['flops']:.2f})" if gain else ""
        device = section[roles[0]]["device"]
        return [Row(f"throughput (img/s)\n{device}",
                    {r: section[r]["images_per_s"] for r in roles}, fmt="rate", note=note,
                    new_section=True)]
