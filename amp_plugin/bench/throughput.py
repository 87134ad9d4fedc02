"""`amp bench throughput`: the realised throughput gain of a pruned model against its
FLOPs ratio, in eager PyTorch, through torch.compile and in ONNX Runtime.

Every runtime's original and pruned model are timed in one interleaved measurement (all
six take turns, run after run), on the same batch and threads; a gain is the ratio of
medians with the interval of the per-run ratios, and claimed only where it excludes 1.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..core.adapter import vision_tower
from ..core.importance import AMPImportance
from ..core.mlp import find_mlps
from ..core.models import create_model
from ..core.tp import prune_mlps
from ..data import digits_raw, to_model_input
from ..search.pruner import AMPPruner
from ..utils.stats import paired_ratio
from ..utils.tensors import DTYPES, resolve_device

RUNTIMES = ("eager", "compiled", "onnxruntime")


def prune_like(model: nn.Module, sizes: dict[str, int], example: torch.Tensor) -> nn.Module:
    """Prune `model` to the given hidden sizes keeping the first neurons (for timing only)."""
    tower, _ = vision_tower(model)
    prune_mlps(tower, example, {n: torch.arange(s) for n, s in sizes.items()})
    return model


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:200]


def _onnx_runner(model: nn.Module, x: torch.Tensor, folder: Path, name: str
                 ) -> Callable[[], object]:
    """The model's features exported to ONNX (checked on digits) and run by onnxruntime
    on the CPU with torch's number of threads, on the same batch."""
    import onnxruntime as ort

    from ..export import INPUT, export_model

    size = x.shape[-1]
    path = folder / f"{name}.onnx"
    export_model(model, path, "onnx", image_size=size, project=False, atol=1e-3, rtol=1e-3)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {INPUT: x.float().cpu().numpy()}
    return lambda: session.run(None, feed)


def time_runtimes(models: dict[str, nn.Module], batch_size: int, image_size: int,
                  dtype: str, device: torch.device, runs: int, warmup: int = 2,
                  runtimes: tuple[str, ...] = RUNTIMES, min_seconds: float = 0.05,
                  show_progress: bool = True) -> tuple[dict, dict]:
    """({runtime: {model: rates}}, {runtime: why it was skipped}): every model in every
    runtime that works here, timed in one interleaved measurement."""
    from ..evaluate.throughput import (
        encoder_runner,
        random_batch,
        rates,
        sync_for,
        timed_copy,
    )
    from ..utils.timing import time_interleaved

    unknown = set(runtimes) - set(RUNTIMES)
    if unknown:
        raise ValueError(f"runtimes: unknown {sorted(unknown)}; expected some of {RUNTIMES}")
    x = random_batch(batch_size, image_size).to(device, DTYPES[dtype])
    skipped: dict[str, str] = {}
    runners: dict[tuple[str, str], Callable[[], object]] = {}
    with contextlib.ExitStack() as stack:
        ready = {k: stack.enter_context(timed_copy(m, device, dtype)) for k, m in models.items()}
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="amp-bench-")))
        for runtime in runtimes:
            try:
                if runtime == "onnxruntime" and (device.type != "cpu" or dtype != "float32"):
                    raise RuntimeError("onnxruntime is timed on the CPU in float32 only "
                                       "(the CPU package of onnxruntime)")
                built = {}
                for key, model in ready.items():
                    if runtime == "onnxruntime":
                        built[key] = _onnx_runner(model, x, folder, key)
                    else:
                        built[key] = encoder_runner(model, x, compile=runtime == "compiled")
                        built[key]()  # torch.compile compiles (or fails) here
            except Exception as e:  # a runtime that does not work here is named, not fatal
                skipped[runtime] = _first_line(e)
                continue
            runners.update({(runtime, key): fn for key, fn in built.items()})
        timing = time_interleaved(runners, runs, warmup, min_seconds, sync_for(device),
                                  show_progress)
    out: dict[str, dict] = {}
    for (runtime, key), t in timing.items():
        out.setdefault(runtime, {})[key] = rates(t, batch_size)
    return out, skipped


def bench_throughput(run=None, model_name: str = "vit_base_patch16_224",
                     threshold: float = 1e-3, round_to: int | None = 64,
                     search_images: int = 32, batch_size: int = 32, image_size: int = 224,
                     dtype: str = "float32", runs: int = 10, seed: int = 0,
                     runtimes: tuple[str, ...] = RUNTIMES, warmup: int = 2,
                     min_seconds: float = 0.05, show_progress: bool = True) -> dict:
    """Images/s of the original and the AMP-pruned vision tower in each runtime, and the
    gain with its interval next to the FLOPs ratio.

    With `run`, the run directory's original and pruned models are timed. Otherwise a
    random-weight `model_name` is scored and searched on digits images (with `round_to`)
    and timed before and after.
    """
    from ..core.cost import count_flops, count_mlp_params
    from ..core.serialization import load_pruned
    from ..evaluate.throughput import device_name
    from ..run.layout import RunDir
    from ..run.pipeline import Run
    from ..run.recipe import load_recipe

    device = resolve_device()
    if run is not None:
        rd = RunDir(run)
        recipe = load_recipe(rd.recipe, check_paths=False)
        original = Run(recipe, run, show_progress=False).original()
        pruned = load_pruned(rd.pruned)
        image_size = recipe.data.image_size
        name = recipe.name
        found = (rd.stage_meta("prune") or {}).get("result", {})
        round_to, entropy = found.get("round_to"), found.get("entropy")
    else:
        torch.manual_seed(seed)
        original = create_model({"library": "timm", "name": model_name,
                                 "kwargs": {"num_classes": 0, "img_size": image_size}}).eval()
        original.to(device)  # score and search where the model will be timed
        raw, _ = digits_raw()
        x = to_model_input(raw[:search_images], image_size, (0.5,) * 3, (0.5,) * 3)
        x = x.to(device)
        imp = AMPImportance(20.0, show_progress=show_progress)
        imp.accumulate(original, [x])
        pruned = copy.deepcopy(original)
        entropy = AMPPruner(pruned, x[:1], imp, [x], threshold, round_to=round_to,
                            show_progress=show_progress).step().entropy
        name = model_name
        original.cpu()
        pruned.cpu()
    example = torch.randn(1, 3, image_size, image_size)
    original, pruned = original.cpu().float().eval(), pruned.cpu().float().eval()
    flops = {"before": count_flops(original, example), "after": count_flops(pruned, example)}
    mlp = {"before": count_mlp_params(original), "after": count_mlp_params(pruned)}
    ratio = flops["before"] / flops["after"]
    timing, skipped = time_runtimes({"before": original, "after": pruned}, batch_size,
                                    image_size, dtype, device, runs, warmup, runtimes,
                                    min_seconds, show_progress)
    rows = {}
    for runtime, t in timing.items():
        gain = paired_ratio(t["after"]["runs_images_per_s"], t["before"]["runs_images_per_s"])
        rows[runtime] = {**t, "gain": gain, "efficiency": gain["ratio"] / ratio,
                         "efficiency_low": gain["low"] / ratio,
                         "efficiency_high": gain["high"] / ratio}
    eager = rows.get("eager", {})
    return {
        "model": name, "device": device_name(device), "dtype": dtype,
        "batch_size": batch_size, "image_size": image_size, "round_to": round_to,
        "entropy": entropy,
        "runs": runs, "warmup": warmup, "threads": torch.get_num_threads(),
        "hidden_sizes": {n: v.hidden for n, v in find_mlps(vision_tower(pruned)[0]).items()},
        "mlp_reduction": 1 - mlp["after"] / mlp["before"], "mlp_params": mlp, "flops": flops,
        "flops_ratio": ratio, "runtimes": rows, "skipped": skipped,
        # the eager numbers at the top level, as before
        "before": eager.get("before"), "after": eager.get("after"),
        "gain": eager.get("gain", {}).get("ratio"), "efficiency": eager.get("efficiency"),
    }
