"""`amp plan`: what a recipe's model costs and what the search will cost, in seconds.

The architecture is built on PyTorch's meta device (shapes only: no weights, no data,
no memory), so a 7.5B-parameter tower is planned on a laptop. Reported: vision-tower
parameters, FLOPs at the recipe's input size, the MLP inventory, the number of forward
passes the score and prune stages will run, and their FLOPs and state-cache bytes at the
recipe's data size (`data.calib_images`, `data.val_images`; e.g. full ImageNet).

FLOPs come from torch.utils.flop_counter (2 FLOPs per multiply-add; matmuls, linears,
convolutions and the attention products are counted; norms, activations and softmax are
not), for one image through the embedding AMP measures (the pooled features, without
the CLIP projection).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import CacheConfig, DataConfig, Recipe
from ..core.adapter import vision_tower
from ..core.cost import count_flops, count_mlp_params, count_params
from ..core.mlp import find_mlps
from ..core.models import ModelSpec, build_model
from ..data.loader import calibration_images
from ..search.allocation import coarse_sizes
from ..search.cache import checkpoint_plan
from ..search.sequential import EarlyDecisions
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
    """Forward passes of the score and prune stages (docs/algorithm.md sections 2 and 3).

    Scoring: one forward + backward per calibration batch. Search: per block at most
    `max_steps` trials plus one reference evaluation when no E_prev is carried over;
    each trial is a pass over the validation batches. With the state cache, a trial of
    block l runs only blocks l..L-1, so on average (L+1)/(2L) of a full pass.
    """
    calib_images = calibration_images(calib_images, batch_size)  # a lone last image: left out
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


# ImageNet-1k's folders, the authors' data: what `all` means when the folder is not here
IMAGENET_TRAIN, IMAGENET_VAL = 1_281_167, 50_000


def _folder_images(root: str | None) -> int | None:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    if root is None or not Path(root).is_dir():
        return None
    return sum(1 for p in Path(root).rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)


def data_counts(d: DataConfig) -> tuple[int, int, list[str]]:
    """(calibration images, validation images, what was assumed): `all` counts the
    folder, or assumes ImageNet-1k's size where the folder is not on this machine."""
    assumed = []

    def whole(root, imagenet, key):
        n = _folder_images(root)
        if n is None:
            assumed.append(f"{key}: all of {root}, assumed ImageNet-1k's {imagenet:,} images")
            return imagenet
        return n

    val = (whole(d.val_root, IMAGENET_VAL, "data.val_images") if d.val_images == "all"
           else d.val_images)
    if d.calib_images != "all":
        return d.calib_images, val, assumed
    calib = whole(d.root, IMAGENET_TRAIN, "data.calib_images")
    return (calib if d.val_from == "val_root" else calib - val), val, assumed


def data_cost(n_blocks: int, flops: int, state_bytes: int, calib_images: int, val_images: int,
              max_steps: int, ranks: int, cache: CacheConfig) -> dict[str, Any]:
    """What a run at this data size costs: FLOPs of scoring and of the search (with the state
    cache, full or checkpointed, against the reference procedure) and the cache's bytes per
    rank in each mode, with the mode the recipe's `amp.cache` budget chooses.

    `flops`: one image through the tower; `state_bytes`: one image's state entering a block.
    Scoring is a forward and a backward pass that computes input gradients only (the
    parameters are frozen): about 2x the forward FLOPs. Search trials are counted at full
    width (the already pruned suffix makes them cheaper: an upper bound). A block is
    counted as 1/L of the tower."""
    per_block_flops = flops / n_blocks
    cached_passes = 1 + max_steps * (n_blocks + 1) / 2
    reference = (n_blocks * max_steps + 1) * flops * val_images
    cached = cached_passes * flops * val_images
    starts = list(range(n_blocks))
    per_block = state_bytes * math.ceil(val_images / ranks)
    full_bytes = per_block * n_blocks
    budget = cache.device_gib * 2**30 + cache.host_gib * 2**30 + (
        math.inf if cache.disk_gib is None else cache.disk_gib * 2**30)

    def checkpointed(fit: int) -> tuple[int, float]:
        marks = checkpoint_plan(starts, fit)
        recompute = sum(i - max(c for c in marks if c <= i) for i in starts)
        return per_block * (len(marks) + 1), cached + recompute * per_block_flops * val_images

    ckpt_bytes, ckpt_flops = checkpointed(n_blocks)
    chosen = {"mode": "full", "bytes": full_bytes, "search_flops": cached}
    if full_bytes > budget:  # as StateCache decides: checkpoints spaced to fit the budget
        fit_bytes, fit_flops = checkpointed(int(budget // per_block))
        chosen = {"mode": "checkpointed", "bytes": fit_bytes, "search_flops": fit_flops}
        if fit_bytes > budget:
            chosen["mode"] = "does not fit: raise amp.cache or lower data.val_images"
    return {
        "calib_images": calib_images, "val_images": val_images, "ranks": ranks,
        "flops": {"score": 2 * flops * calib_images, "search_reference": reference,
                  "search_cached": cached, "search_checkpointed": ckpt_flops},
        "cache_bytes_per_rank": {"full": full_bytes, "checkpointed": ckpt_bytes,
                                 "budget": budget},
        "chosen": chosen,
    }


def refinement_points(hidden: int, grid: int, coarse_points: int, refine_rounds: int) -> int:
    """Grid points one solve's refinement adds to a curve at most: each round measures the
    points halfway to the chosen size's two neighbours, until they are one grid unit apart."""
    step = hidden / coarse_points / grid  # coarse spacing in grid units
    return 2 * min(refine_rounds, max(0, math.ceil(math.log2(step)))) if step > 1 else 0


def recompute_forwards(n_blocks: int, checkpoints: list[int] | None, images: int) -> int:
    """Image-block forwards to recompute the states entering every block from the
    checkpoints below them once (0 with the full cache)."""
    if checkpoints is None:
        return 0
    return sum(i - max(c for c in checkpoints if c <= i) for i in range(n_blocks)) * images


def global_cost(hidden: list[int], val_images: int, curve_images: int, grid: int,
                coarse_points: int, refine_rounds: int, verifications: int,
                original_references: bool = True, checkpoints: list[int] | None = None
                ) -> dict[str, Any]:
    """Image-block forwards of the global allocation (`search.allocation`) over MLPs of
    `hidden` sizes, one per block in forward order (block l of L), beside the greedy
    binary search's, both with the state cache.

    Greedy: the caching pass (blocks 0..L-2), one reference evaluation (block L-1), and
    max_steps trials of block l, each running blocks l..L-1. Global: the caching pass, the
    original's references and values (block L-1), each curve point of block l running
    blocks l..L-1 on the curve images (coarse points plus what one solve's refinement adds),
    and `verifications` passes of all blocks on all images. With a checkpointed cache the
    states of the curve images are recomputed from the checkpoints once per sweep over the
    blocks (the coarse grid, then each refinement round).

    The points are those of one solve whose chosen sizes stay where the coarse grid put
    them; at most, every round of every solve (one per verification) adds 2 per block
    (`curves_at_most`)."""
    n = len(hidden)
    cache = (n - 1) * val_images
    coarse = [len(coarse_sizes(h, grid, coarse_points)) for h in hidden]
    points = [c + refinement_points(h, grid, coarse_points, refine_rounds)
              for c, h in zip(coarse, hidden, strict=True)]
    most = [min(c + 2 * refine_rounds * verifications, math.ceil(h / grid) - 1)
            for c, h in zip(coarse, hidden, strict=True)]
    curves = sum(p * (n - i) for i, p in enumerate(points)) * curve_images
    curves_most = sum(p * (n - i) for i, p in enumerate(most)) * curve_images
    bases = (1 + original_references) * val_images + (curve_images < val_images) * curve_images
    verification = verifications * n * val_images
    sweeps = 1 + max(p // 2 for p in [refinement_points(h, grid, coarse_points, refine_rounds)
                                      for h in hidden])
    cache += sweeps * recompute_forwards(n, checkpoints, curve_images)
    total = cache + bases + curves + verification
    return {"curve_images": curve_images, "points_per_curve": max(points),
            "points": sum(points), "points_per_curve_at_most": max(most),
            "image_block_forwards": {
                "cache": cache, "references_and_bases": bases, "curves": curves,
                "curves_at_most": curves_most, "verification": verification, "total": total},
            "full_forward_equivalents": round(total / (n * val_images), 1),
            "curves_full_forward_equivalents": round(curves / (n * val_images), 1)}


def greedy_block_forwards(n_blocks: int, max_steps: int, val_images: int) -> int:
    """Image-block forwards of the cached greedy search (see `global_cost`)."""
    return (n_blocks - 1 + 1 + max_steps * n_blocks * (n_blocks + 1) // 2) * val_images


def early_cost(n_blocks: int, max_steps: int, batches: int, batch_size: int,
               min_batches: int = EarlyDecisions.min_batches, read_fraction: float | None = None,
               checkpoints: list[int] | None = None) -> dict[str, Any]:
    """Image-block forwards of the greedy search: the reference procedure (every trial and
    the starting E_val a full pass), today's state cache, and early decisions
    (`amp.search.confidence`). With early decisions the caching pass and the starting E_val
    are as before; the trials read a fraction of their batches, all of them at most (the
    cache's count). Best case: every block accepts a size, which is read to the end (for
    the exact E_prev), and every other trial stops after `min_batches`. `read_fraction`: a
    measured fraction of the trials' batches read (`amp bench search --confidence`)."""
    images = batches * batch_size
    reference = (n_blocks * max_steps + 1) * n_blocks * images
    cache = greedy_block_forwards(n_blocks, max_steps, images) + recompute_forwards(
        n_blocks, checkpoints, images)
    trials = max_steps * n_blocks * (n_blocks + 1) // 2 * images
    fixed = cache - trials
    least = (1 + (max_steps - 1) * min(1.0, min_batches / max(batches, 1))) / max_steps
    out = {"images": images, "batches": batches, "min_batches": min_batches,
           "image_block_forwards": {"reference": reference, "cache": cache,
                                    "early_best_case": fixed + round(trials * least),
                                    "early_at_most": cache},
           "least_read_fraction": least, "read_fraction": read_fraction}
    if read_fraction is not None:
        out["image_block_forwards"]["early_at_read_fraction"] = fixed + round(
            trials * read_fraction)
    return out


def implied_hours(forwards: dict[str, int], n_blocks: int, calib_images: int,
                  score_per_s: float, val_per_s: float) -> dict[str, dict[str, float]]:
    """Hours of scoring (calibration images at `score_per_s`) plus the search (image-block
    forwards at `val_per_s` images through every block per second) for each count."""
    score = calib_images / score_per_s / 3600
    return {k: {"score": score, "search": n / n_blocks / val_per_s / 3600,
                "total": score + n / n_blocks / val_per_s / 3600} for k, n in forwards.items()}


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


def allocation_cost(recipe: Recipe, hidden: list[int], val_images: int,
                    curve_images: int | None = None, checkpoints: list[int] | None = None
                    ) -> dict[str, Any]:
    """Greedy search and global allocation side by side, in image-block forwards, at the
    recipe's search settings (`curve_images` overrides amp.search.curve_images), with the
    cache checkpointed at `checkpoints` (None: full)."""
    a, s = recipe.amp, recipe.amp.search
    batch = recipe.data.batch_size
    curve = curve_images or s.curve_images or val_images
    curve = max(batch, min(val_images, curve // batch * batch))
    grid = a.round_to or s.grid
    threshold_mode = a.target is None
    glob = global_cost(hidden, val_images, curve, grid, s.coarse_points, s.refine_rounds,
                       s.max_verifications if threshold_mode else 1,
                       s.measure != "entropy_rise", checkpoints)
    n = len(hidden)
    greedy = (greedy_block_forwards(n, a.max_steps, val_images)
              + recompute_forwards(n, checkpoints, val_images))
    glob.update(grid=grid, coarse_points=s.coarse_points, refine_rounds=s.refine_rounds,
                verifications=s.max_verifications if threshold_mode else 1,
                cache="checkpointed" if checkpoints else "full")
    return {"blocks": n, "val_images": val_images, "greedy": {
        "image_block_forwards": greedy,
        "full_forward_equivalents": round(greedy / (n * val_images), 1)},
        "global": glob, "curves_over_greedy": glob["image_block_forwards"]["curves"] / greedy,
        "curves_at_most_over_greedy": glob["image_block_forwards"]["curves_at_most"] / greedy,
        "chosen": s.allocation}


def plan(recipe: Recipe, ranks: int = 1, curve_images: int | None = None,
         read_fraction: float | None = None,
         images_per_s: tuple[float, float] | None = None) -> dict[str, Any]:
    """The plan of a recipe (see the module's docstring). `read_fraction`: the fraction of
    their batches that trials read with early decisions (as measured); `images_per_s`:
    (scoring, validation) throughput, for the implied hours of each search option."""
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
    calib_images, val_images, assumed = data_counts(d)
    cost = search_cost(len(views), recipe.amp.max_steps, calib_images, val_images,
                       d.batch_size)
    cost["assumed"] = assumed
    if recipe.amp.target is not None:
        cost["budget"] = budget_cost(cost, recipe.amp.target.max_searches)
    val_imgs = cost["validation"]["images"]
    cost["validation"]["state_cache_bytes"] = val_imgs * tokens * width * bytes_per * len(views)
    cost["at_data_size"] = data_cost(len(views), flops, tokens * width * bytes_per,
                                     calib_images, val_imgs, recipe.amp.max_steps, ranks,
                                     recipe.amp.cache)
    at = cost["at_data_size"]
    checkpoints = None
    if at["chosen"]["mode"] == "checkpointed":  # where StateCache puts them for this budget
        per_block = at["cache_bytes_per_rank"]["full"] / len(views)
        checkpoints = checkpoint_plan(list(range(len(views))),
                                      int(at["cache_bytes_per_rank"]["budget"] // per_block))
    cost["allocation"] = allocation_cost(recipe, [v.hidden for v in views.values()],
                                         val_imgs, curve_images, checkpoints)
    early = early_cost(len(views), recipe.amp.max_steps, cost["validation"]["batches"],
                       d.batch_size, read_fraction=read_fraction, checkpoints=checkpoints)
    early["confidence"] = recipe.amp.search.confidence
    if images_per_s is not None:
        early["images_per_s"] = {"score": images_per_s[0], "validation": images_per_s[1]}
        early["hours"] = implied_hours(early["image_block_forwards"], len(views),
                                       calib_images, *images_per_s)
    cost["counted"] = early
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

