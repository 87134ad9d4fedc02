"""Throughput of vision encoders (task `throughput`): images per second through the
features AMP measures (the same computation `core.cost.count_flops` counts, so the gain
can be set against the FLOPs ratio, its ideal value).

Models compared are timed together, interleaved run by run (`utils.timing`), on the same
batch with the same threads; each reports its median and interquartile range over the
runs, and a gain is claimed only where its interval excludes 1 (`utils.stats`).
"""

from __future__ import annotations

import contextlib
import copy
import platform
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from ..core.adapter import vision_tower
from ..utils.stats import paired_ratio, quartiles
from ..utils.tensors import DTYPES, device_of, resolve_device
from ..utils.timing import time_interleaved
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


def sync_for(device: torch.device) -> Callable[[], None]:
    """What waits for the device's queued work before a clock is read."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _check(batch_size: int, runs: int, warmup: int, dtype: str) -> None:
    if batch_size < 1 or runs < 1 or warmup < 0:
        raise ValueError(f"need batch_size >= 1, runs >= 1, warmup >= 0; got {batch_size}, "
                         f"{runs}, {warmup}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")


@contextlib.contextmanager
def timed_copy(model: nn.Module, device: torch.device, dtype: str = "float32",
               sdpa: bool | None = None) -> Iterator[nn.Module]:
    """`model` ready to be timed on `device`: in eval mode; in float32 the model itself
    (moved there and back afterwards), in bf16/fp16 a copy cast as its library runs that
    precision (weights in that dtype, not autocast, which re-casts every weight on every
    call); `sdpa` True/False switches timm's fused scaled-dot-product attention on/off for
    the measurement (None: as built)."""
    home, was_training = device_of(model), model.training
    if dtype == "float32":
        work = model.to(device).eval()
    else:
        _, adapter = vision_tower(model)
        work = adapter.cast(copy.deepcopy(model), device, DTYPES[dtype]).eval()
    switched = [(m, m.fused_attn) for m in work.modules() if hasattr(m, "fused_attn")]
    try:
        if sdpa is not None:
            for m, _ in switched:
                m.fused_attn = sdpa
        yield work
    finally:
        for m, before in switched:
            m.fused_attn = before
        if work is model:
            model.to(home).train(was_training)


@contextlib.contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU threads set to `threads` for a measurement (None: unchanged)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def random_batch(batch_size: int, image_size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, 3, image_size, image_size, generator=g)


def encoder_runner(model: nn.Module, x: torch.Tensor, compile: bool = False
                   ) -> Callable[[], torch.Tensor]:
    """A call that runs the vision tower's features on `x` without gradients; with
    `compile`, through torch.compile (compiled at the first call)."""
    tower, adapter = vision_tower(model)

    def features(inp):
        return adapter.features(tower, inp)

    fn = torch.compile(features) if compile else features

    @torch.no_grad()
    def run():
        return fn(x)

    return run


def rates(timing: dict, batch_size: int) -> dict:
    """Images/s of one runner of `time_interleaved`: median, quartiles, every run."""
    per_run = [batch_size / s for s in timing["seconds"]]
    q = quartiles(per_run)
    return {"images_per_s": q["median"], "q1": q["q1"], "q3": q["q3"], "min": q["min"],
            "max": q["max"], "seconds_per_batch": batch_size / q["median"],
            "runs_images_per_s": per_run, "batches_per_run": timing["number"]}


def compare_throughput(models: Mapping[str, nn.Module], batch_size: int = 64,
                       image_size: int = 224, dtype: str = "float32",
                       device: str | torch.device | None = None, warmup: int = 3,
                       runs: int = 20, seed: int = 0, compile: bool = False,
                       sdpa: bool | None = None, min_seconds: float = 0.05,
                       threads: int | None = None, show_progress: bool = True) -> dict:
    """Images/s of every model's vision tower, timed interleaved on one random batch:
    {name: {images_per_s (median), q1, q3, min, max, runs_images_per_s, ...}} plus the
    conditions (device, batch, threads, ...) under "conditions".

    Every model runs `warmup` untimed batches, then `runs` timed runs in turns (the order
    reversed every turn), a run repeating the batch until it lasts `min_seconds`, with
    `threads` CPU threads (default: torch's). All models are on `device` at once during
    the timing and go back afterwards.
    """
    _check(batch_size, runs, warmup, dtype)
    if not models:
        raise ValueError("compare_throughput: no models")
    if device is None:
        device = device_of(next(iter(models.values())))
    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    if threads is not None and threads < 1:
        raise ValueError(f"threads: expected >= 1, got {threads}")
    x = random_batch(batch_size, image_size, seed).to(device, DTYPES[dtype])
    with contextlib.ExitStack() as stack:
        stack.enter_context(cpu_threads(threads))
        runners = {name: encoder_runner(stack.enter_context(timed_copy(m, device, dtype, sdpa)),
                                        x, compile) for name, m in models.items()}
        timing = time_interleaved(runners, runs, warmup, min_seconds, sync_for(device),
                                  show_progress)
        cond = {"device": device_name(device), "threads": torch.get_num_threads()}
    out = {name: rates(t, batch_size) for name, t in timing.items()}
    out["conditions"] = {**cond, "batch_size": batch_size, "image_size": image_size,
                         "dtype": dtype, "warmup": warmup, "runs": runs,
                         "min_seconds": min_seconds, "compile": compile, "sdpa": sdpa,
                         "interleaved": list(models)}
    return out


def measure_throughput(model: nn.Module, batch_size: int = 64, image_size: int = 224,
                       dtype: str = "float32", device: str | torch.device | None = None,
                       warmup: int = 3, runs: int = 10, seed: int = 0,
                       show_progress: bool = True, **options) -> dict:
    """Images/s of one vision tower (`compare_throughput` of one model): median,
    quartiles and every run, with the conditions of the measurement."""
    out = compare_throughput({"model": model}, batch_size, image_size, dtype, device, warmup,
                             runs, seed, show_progress=show_progress, **options)
    return {**out["model"], **out["conditions"]}


# ---- the eval task -------------------------------------------------------------------------
def _rate(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def _interval(r: dict, prefix: str = "") -> str:
    return f"{prefix}{r['ratio']:.2f} [{r['low']:.2f}-{r['high']:.2f}]"


SPREAD_NOTE = ("images/s: median of the runs, the models timed in turns, and in brackets "
               "the interquartile range; gains: ratio of the medians, in brackets the >= 95% "
               "interval of the median per-run ratio; a gain is claimed only where that "
               "interval excludes 1")


@register_task
class Throughput(EvalTask):
    """Every model of the evaluation timed together (`joint`), interleaved run by run."""

    name = "throughput"
    order = 90
    joint = True

    def example(self, root):
        return {"throughput": {"batch_size": 4, "warmup": 1, "runs": 3, "device": "cpu",
                               "min_run_seconds": 0.0}}

    def run_joint(self, models, cfg, ctx):
        t = cfg.throughput
        out = compare_throughput(models, t.batch_size, t.image_size or ctx.data.image_size,
                                 t.dtype, resolve_device(t.device), t.warmup, t.runs,
                                 compile=t.compile, sdpa=t.sdpa, min_seconds=t.min_run_seconds,
                                 threads=t.threads, show_progress=ctx.show_progress)
        cond = out.pop("conditions")
        for role, r in out.items():
            ctx.log(f"{role}: {r['images_per_s']:.1f} images/s [{r['q1']:.1f}-{r['q3']:.1f}] "
                    f"on {cond['device']}")
        return {role: {**r, **cond} for role, r in out.items()}

    def finish(self, section, models):
        def runs(role):
            return (section.get(role) or {}).get("runs_images_per_s")

        if "teacher" in section:
            base = section["teacher"]["images_per_s"]
            for role in models:
                if role == "teacher" or role not in section:
                    continue
                flops = models["teacher"]["flops"] / max(models[role]["flops"], 1)
                gain = {"throughput": section[role]["images_per_s"] / base, "flops": flops}
                if runs(role) and runs("teacher") and len(runs(role)) == len(runs("teacher")):
                    r = paired_ratio(runs(role), runs("teacher"))
                    gain.update(low=r["low"], high=r["high"], coverage=r["coverage"],
                                differs=r["differs"], efficiency=r["ratio"] / flops,
                                efficiency_low=r["low"] / flops,
                                efficiency_high=r["high"] / flops)
                section[f"{role}_gain"] = gain
        if runs("pruned") and runs("distilled") and len(runs("pruned")) == len(
                runs("distilled")):
            section["distilled_vs_pruned"] = paired_ratio(runs("distilled"), runs("pruned"))

    def rows(self, section):
        roles = [r for r in ROLES if r in section]
        if not roles:
            return []
        device = section[roles[0]]["device"]
        gain = section.get("pruned_gain")
        if not all("q1" in section[r] for r in roles):  # measured before spreads were kept
            note = f"x{gain['throughput']:.2f} (FLOPs x{gain['flops']:.2f})" if gain else ""
            return [Row(f"throughput (img/s)\n{device}",
                        {r: section[r]["images_per_s"] for r in roles}, fmt="rate",
                        note=note, new_section=True)]
        first = section[roles[0]]
        label = (f"throughput (img/s)\n{device}, {first['dtype']}, batch "
                 f"{first['batch_size']}, {first['runs']} runs")
        cells = {r: f"{_rate(section[r]['images_per_s'])} [{_rate(section[r]['q1'])}-"
                    f"{_rate(section[r]['q3'])}]" for r in roles}
        note = ""
        if gain and "low" in gain:
            r = {"ratio": gain["throughput"], "low": gain["low"], "high": gain["high"]}
            note = f"{_interval(r, 'x')} (FLOPs x{gain['flops']:.2f})"
            if not gain["differs"]:
                note = f"no gain beyond the spread: {note}"
        rows = [Row(label, {r: section[r]["images_per_s"] for r in roles}, fmt="rate",
                    note=note, new_section=True, footnote=SPREAD_NOTE, text=cells)]
        eff = {r: section[f"{r}_gain"] for r in roles if "efficiency" in
               section.get(f"{r}_gain", {})}
        if eff:
            rows.append(Row("gain / FLOPs ratio", {r: g["efficiency"] for r, g in eff.items()},
                            fmt="rate", text={r: _interval({
                                "ratio": g["efficiency"], "low": g["efficiency_low"],
                                "high": g["efficiency_high"]}) for r, g in eff.items()}))
        same = section.get("distilled_vs_pruned")
        if same:
            rows.append(Row("img/s distilled / pruned", {"distilled": same["ratio"]},
                            fmt="rate", text={"distilled": _interval(same, "x")},
                            note="differs beyond the spread" if same["differs"]
                            else "same within the spread"))
        return rows
