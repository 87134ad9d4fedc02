"""`amp bench throughput`: the realised throughput gain of a pruned model against its
FLOPs ratio."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..core.adapter import vision_tower
from ..core.importance import AMPImportance
from ..core.mlp import find_mlps
from ..core.models import create_model
from ..core.pruner import AMPPruner
from ..core.tp import prune_mlps
from ..data import digits_raw, to_model_input
from ..utils.tensors import resolve_device


def prune_like(model: nn.Module, sizes: dict[str, int], example: torch.Tensor) -> nn.Module:
    """Prune `model` to the given hidden sizes keeping the first neurons (for timing only)."""
    tower, _ = vision_tower(model)
    prune_mlps(tower, example, {n: torch.arange(s) for n, s in sizes.items()})
    return model


def bench_throughput(run=None, model_name: str = "vit_base_patch16_224",
                     threshold: float = 1e-3, round_to: int | None = 64,
                     search_images: int = 32, batch_size: int = 32, image_size: int = 224,
                     dtype: str = "float32", runs: int = 10, seed: int = 0,
                     show_progress: bool = True) -> dict:
    """Images/s of the original and the AMP-pruned vision tower, and gain / FLOPs ratio.

    With `run`, the run directory's original and pruned models are timed. Otherwise a
    random-weight `model_name` is scored and searched on digits images (with `round_to`)
    and timed before and after.
    """
    from ..core.cost import count_flops, count_mlp_params
    from ..core.serialization import load_pruned
    from ..evaluate.throughput import measure_throughput
    from ..run.layout import RunDir
    from ..run.pipeline import Run
    from ..run.recipe import load_recipe

    if run is not None:
        rd = RunDir(run)
        recipe = load_recipe(rd.recipe, check_paths=False)
        original = Run(recipe, run, show_progress=False).original()
        pruned = load_pruned(rd.pruned)
        image_size = recipe.data.image_size
        name = recipe.name
    else:
        torch.manual_seed(seed)
        original = create_model({"library": "timm", "name": model_name,
                                 "kwargs": {"num_classes": 0, "img_size": image_size}}).eval()
        original.to(resolve_device())  # score and search where the model will be timed
        raw, _ = digits_raw()
        x = to_model_input(raw[:search_images], image_size, (0.5,) * 3, (0.5,) * 3)
        x = x.to(resolve_device())
        imp = AMPImportance(20.0, show_progress=show_progress)
        imp.accumulate(original, [x])
        pruned = copy.deepcopy(original)
        AMPPruner(pruned, x[:1], imp, [x], threshold, round_to=round_to,
                  show_progress=show_progress).step()
        name = model_name
    example = torch.randn(1, 3, image_size, image_size, device=next(pruned.parameters()).device)
    original.to(example.device)
    flops = {"before": count_flops(original, example), "after": count_flops(pruned, example)}
    mlp = {"before": count_mlp_params(original), "after": count_mlp_params(pruned)}
    timing = {}
    for key, m in (("before", original), ("after", pruned)):
        timing[key] = measure_throughput(m, batch_size, image_size, dtype, resolve_device(),
                                         warmup=2, runs=runs, show_progress=show_progress)
    gain = timing["after"]["images_per_s"] / timing["before"]["images_per_s"]
    ratio = flops["before"] / flops["after"]
    return {
        "model": name, "device": timing["before"].get("device", ""), "dtype": dtype,
        "batch_size": batch_size, "image_size": image_size, "round_to": round_to,
        "hidden_sizes": {n: v.hidden for n, v in find_mlps(vision_tower(pruned)[0]).items()},
        "mlp_reduction": 1 - mlp["after"] / mlp["before"], "mlp_params": mlp, "flops": flops,
        "flops_ratio": ratio, "before": timing["before"], "after": timing["after"],
        "gain": gain, "efficiency": gain / ratio,
    }
