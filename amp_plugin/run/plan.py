"""`amp plan`: what a recipe's model costs and what the search will cost, in seconds.

The architecture is built on PyTorch's meta device (shapes only: no weights, no data,
no memory), so a 7.5B-parameter tower is planned on a laptop. Reported: vision-tower
parameters, FLOPs at the recipe's input size, the MLP inventory and the number of
forward passes the score and prune stages will run.

FLOPs come from torch.utils.flop_counter (2 FLOPs per multiply-add; matmuls, linears,
convolutions and the attention products are counted; norms, activations and softmax are
not), for one image through the embedding AMP measures (the pooled features, without
the CLIP projection).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from typing import Any

import torch
from torch import nn

from ..config import Recipe
from ..core.adapter import vision_tower
from ..core.cost import count_flops, count_mlp_params, count_params
from ..core.mlp import find_mlps
from ..core.models import ModelSpec, build_model
from ..utils.tensors import resolve_dtype

FLOP_COUNTER = ("torch.utils.flop_counter.FlopCounterMode (2 FLOPs per multiply-add, "
                "attention matmuls included)")


def build_meta(spec: ModelSpec) -> nn.Module:
    """The spec's architecture with meta tensors (no weights read, nothing allocated),
    built by the same builder as `amp run`."""
    with torch.device("meta"):
        return build_model(spec)


def search_cost(n_blocks: int, max_steps: int, calib_images: int, val_images: int,
                batch_size: int) -> dict[str, Any]:
    """Forward passes of the score and prune stages (ALGORITHM.md 2 and 3).

    Scoring: one forward + backward per calibration batch. Search: per block at most
    `max_steps` trials plus one reference evaluation when no E_prev is carried over;
    each trial is a pass over the validation batches. With the state cache, a trial of
    block l runs only blocks l..L-1, so on average (L+1)/(2L) of a full pass.
    """
    calib_batches = math.ceil(calib_images / batch_size)
    val_batches = val_images // batch_size
    trials = n_blocks * max_steps
    # block l (0-based) runs L - l of the L blocks per trial
    cached_passes = 1 + max_steps * sum(n_blocks - i for i in range(n_blocks)) / n_blocks
    return {
        "calibration": {"images": calib_images, "batches": calib_batches,
                        "forward_backward_passes": calib_batches},
        "validation": {
            "images": val_batches * batch_size,
            "batches": val_batches,
            "entropy_evaluations": {"usual": trials + 1, "at_most": n_blocks * (max_steps + 1)},
            "full_forward_passes_reference": trials + 1,
            "image_forwards_reference": (trials + 1) * val_batches * batch_size,
            "full_forward_equivalents_cached": round(cached_passes, 1),
            "image_forwards_cached": round(cached_passes * val_batches * batch_size),
        },
    }


def budget_cost(cost: dict[str, Any], max_searches: int) -> dict[str, Any]:
    """Budget mode (`amp.target`): up to `max_searches` AMP searches, each over the same
    cached states, so the caching pass is paid once and each search costs its trials."""
    v = cost["validation"]
    per_search = v["full_forward_equivalents_cached"] - 1  # minus the one caching pass
    at_most = 1 + max_searches * per_search
    return {
        "max_searches": max_searches,
        "full_forward_equivalents_per_search": round(per_search, 1),
        "full_forward_equivalents_at_most": round(at_most, 1),
        "image_forwards_at_most": round(at_most * v["images"]),
        "entropy_evaluations_at_most": max_searches * v["entropy_evaluations"]["at_most"],
    }


def plan(recipe: Recipe) -> dict[str, Any]:
    t0 = time.perf_counter()
    spec = recipe.model
    model = build_meta(spec)
    tower, adapter = vision_tower(model)
    size = recipe.data.image_size
    x = torch.empty(1, 3, size, size, device="meta")
    params, mlp_params = count_params(tower), count_mlp_params(tower)
    flops = count_flops(tower, x)
    views = find_mlps(tower)
    state = adapter.embed(tower, x)
    tokens, width = state[0].shape[1], state[0].shape[-1]
    groups = Counter((v.hidden, v.kind) for v in views.values())
    inventory = [{"count": n, "hidden": h, "kind": k,
                  "params": sum(v.num_params() for v in views.values()
                                if (v.hidden, v.kind) == (h, k))}
                 for (h, k), n in groups.items()]
    for row in inventory:
        row["share_of_params"] = row["params"] / params
    bytes_per = torch.finfo(resolve_dtype(recipe.amp.dtype)).bits // 8
    d = recipe.data
    cost = search_cost(len(views), recipe.amp.max_steps, d.calib_images, d.val_images,
                       d.batch_size)
    if recipe.amp.target is not None:
        cost["budget"] = budget_cost(cost, recipe.amp.target.max_searches)
    val_imgs = cost["validation"]["images"]
    cost["validation"]["state_cache_bytes"] = val_imgs * tokens * width * bytes_per * len(views)
    return {
        "recipe": recipe.name,
        "model": spec.model_dump(),
        "tower": f"{type(tower).__module__}.{type(tower).__name__}",
        "adapter": adapter.family,
        "image_size": size,
        "tokens": tokens,
        "width": width,
        "blocks": len(adapter.blocks(tower)),
        "params": params,
        "mlp_params": mlp_params,
        "mlp_share": mlp_params / params,
        "flops": flops,
        "flop_counter": FLOP_COUNTER,
        "mlps": [{"name": n, "hidden": v.hidden, "kind": v.kind} for n, v in views.items()],
        "inventory": inventory,
        "search": cost,
        "dtype": recipe.amp.dtype,
        "seconds": time.perf_counter() - t0,
    }

