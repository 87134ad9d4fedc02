"""`amp bench search`: the search's speed against the reference procedure.

`reference_search` is the adaptive search written plainly (every trial runs the whole
model over the whole validation set, neurons removed by masks). It lives here, not in the
library's hot path, to measure AMPPruner against.
"""

from __future__ import annotations

import copy
import math
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..core.adapter import vision_tower
from ..core.criterion import entropy_loss
from ..core.importance import AMPImportance
from ..core.mlp import find_mlps
from ..core.models import create_model
from ..data import batches, digits_raw, to_model_input
from ..evaluate.throughput import device_name
from ..search.greedy import keep_order
from ..search.measures.kl import KL
from ..search.pruner import AMPPruner
from ..search.sequential import EarlyDecisions
from ..utils.progress import progress
from ..utils.stats import spread
from ..utils.tensors import resolve_device
from .replay import RecordingDecisions, replay


@torch.no_grad()
def reference_search(model: nn.Module, scores: dict[str, torch.Tensor], val: list[torch.Tensor],
                     threshold: float, inv_temperature: float, max_steps: int = 6,
                     show_progress: bool = True) -> dict[str, int]:
    tower, adapter = vision_tower(model)
    views = list(find_mlps(tower).items())
    masks = {n: torch.ones(v.hidden, device=v.output.weight.device,
                           dtype=v.output.weight.dtype) for n, v in views}
    hooks = [v.tap.register_forward_pre_hook(lambda m, a, n=n: (a[0] * masks[n],))
             for n, v in views]

    def e_val() -> float:
        return sum(entropy_loss(adapter.features(tower, x), inv_temperature).item()
                   for x in val) / len(val)

    try:
        e_prev = None
        for i in progress(range(len(views)), "reference search", enabled=show_progress):
            name, view = views[len(views) - 1 - i]
            if e_prev is None:
                e_prev = e_val()
            order = keep_order(scores[name])
            lo, hi, best, e_best = 0, view.hidden, view.hidden, None
            for _ in range(max_steps):
                mid = (lo + hi) // 2
                masks[name] = torch.zeros_like(masks[name])
                masks[name][order[:mid]] = 1
                e_mid = e_val()
                if e_mid - e_prev <= threshold:
                    hi, best, e_best = mid, mid, e_mid
                else:
                    lo = mid
            masks[name] = torch.zeros_like(masks[name])
            masks[name][order[:best]] = 1
            e_prev = e_best
    finally:
        for h in hooks:
            h.remove()
    return {n: int(m.sum()) for n, m in masks.items()}


@torch.no_grad()
def kl_to_original(original: nn.Module, pruned: nn.Module, val: list[torch.Tensor],
                   inv_temperature: float) -> float:
    """The search measure `kl` of `pruned` against `original`, by full forward passes."""
    measure = KL(inv_temperature)
    t0, a0 = vision_tower(original)
    t1, a1 = vision_tower(pruned)
    return sum(float(measure(a1.features(t1, x), None, measure.reference(a0.features(t0, x))))
               for x in val) / len(val)


def _block_costs(model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(FLOPs of a block outside its MLP, FLOPs per MLP hidden neuron) for input x."""
    tower, adapter = vision_tower(model)
    state = adapter.embed(tower, x)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        adapter.run_block(tower, 0, state)
    total = counter.get_total_flops()
    view = next(iter(find_mlps(tower).values()))
    tokens = state[0].shape[0] * state[0].shape[1]
    per_neuron = 2 * tokens * sum(lin.in_features for lin in view.inputs)
    per_neuron += 2 * tokens * view.output.out_features
    per_neuron *= 2 if view.packed else 1
    return total - per_neuron * view.hidden, per_neuron


def suffix_bound(trace, hidden: int, n_blocks: int, attn: float, per_neuron: float,
                 max_steps: int) -> float:
    """Best ratio an exact search can reach on this trace: the reference's cost (every trial
    runs all blocks at full width, since it removes neurons by masks) over running only
    blocks l..L-1 per trial (block l masked, the later ones already pruned) plus one pass
    to cache the block inputs; counted in FLOPs."""
    full = attn + per_neuron * hidden
    ref = (1 + max_steps * n_blocks) * n_blocks * full
    sizes = [hidden] * n_blocks
    fast = n_blocks * full  # the caching pass over the original model
    by_block: dict[int, list] = {}
    for t in trace:
        by_block.setdefault(t.index, []).append(t)
    for blk in range(n_blocks - 1, -1, -1):
        trials = by_block.get(blk, [])
        suffix = sum(attn + per_neuron * h for h in sizes[blk + 1:])
        fast += len(trials) * (full + suffix)  # the searched block runs full width, masked
        accepted = [t.size for t in trials if t.accepted]
        sizes[blk] = min(accepted) if accepted else hidden
    return ref / fast


CALIB_IMAGES = 64


def bench_images(count: int, image_size: int) -> torch.Tensor:
    """`count` model inputs: the 1,797 digits, then their mirror images, then transposed,
    then upside down (7,188 in all)."""
    raw, _ = digits_raw()
    raw = torch.cat([raw, raw.flip(-1), raw.transpose(-1, -2), raw.flip(-2)])
    if count > len(raw):
        raise ValueError(f"{count} images asked for: the digits and their mirrored, "
                         f"transposed and flipped copies are {len(raw)}")
    return to_model_input(raw[:count], image_size, (0.5,) * 3, (0.5,) * 3)


def bench_vit(layers: int, width: int, image_size: int, patch_size: int, seed: int
              ) -> nn.Module:
    """The benchmarks' random-weight timm ViT (seeded; MLP hidden 4 x `width`; a head per
    64 channels; no classifier), in eval mode."""
    torch.manual_seed(seed)
    spec = {"library": "timm", "name": "vit_small_patch16_224",
            "kwargs": dict(img_size=image_size, patch_size=patch_size, embed_dim=width,
                           depth=layers, num_heads=max(1, width // 64), num_classes=0)}
    return create_model(spec).eval()


def bench_model(layers: int, width: int, val_images: int, image_size: int, patch_size: int,
                inv_temperature: float, seed: int, batch_size: int | None, device: str,
                dtype: str, show_progress: bool = True):
    """(model, validation batches, importance, scores) of the benchmark: a random-weight
    ViT of `layers` blocks and `width`, scored on 64 digits images; validation: the next
    `val_images` in batches of `batch_size` (default: one), up to 7,124 (the digits, then
    mirrored, transposed and upside-down copies of them)."""
    from ..utils.tensors import resolve_dtype

    dev, dt = resolve_device(device), resolve_dtype(dtype)
    model = bench_vit(layers, width, image_size, patch_size, seed).to(dev, dt).eval()
    images = bench_images(CALIB_IMAGES + val_images, image_size).to(dev, dt)
    val = batches(images[CALIB_IMAGES:], batch_size or val_images)
    imp = AMPImportance(inv_temperature, show_progress=show_progress)
    scores = imp.accumulate(model, [images[:CALIB_IMAGES]])
    return model, val, imp, scores


def reference_block_forwards(trace, n_blocks: int, images: int) -> int:
    """Image-block forwards of the reference procedure that makes the decisions of `trace`
    (a search's, in search order): every trial and every E_val before a block (the first,
    and after a block that accepted no size) is a full pass of every block and image."""
    passes, previous = len(trace), None
    for t in trace:
        if t.block != previous:
            accepted = previous is not None and any(
                u.accepted for u in trace if u.block == previous)
            passes += previous is None or not accepted
            previous = t.block
    return passes * n_blocks * images


def bench_search(layers: int = 12, width: int = 384, val_images: int = 64,
                 image_size: int = 32, patch_size: int = 8, threshold: float = 2e-3,
                 inv_temperature: float = 20.0, seed: int = 0, batch_size: int | None = None,
                 cache_mib: float | None = None, repeats: int = 2, device: str = "cpu",
                 dtype: str = "float32", show_progress: bool = True) -> dict:
    """Reference procedure vs AMPPruner with the full state cache vs AMPPruner under a
    cache budget (`cache_mib`; default a quarter of the full cache, which makes the cache
    checkpointed), on the same random-weight ViT and digits images, on `device` in `dtype`;
    then a global allocation by KL at the MLP parameters the greedy search kept, its cost in
    image-block forwards beside the greedy search's and the KL of both to the original.
    Calibration: 64 other images; validation: `val_images` in batches of `batch_size`
    (default: one). The two cached runs alternate `repeats` times and the fastest of each
    counts (the machine may be shared)."""
    dev = resolve_device(device)
    model, val, imp, scores = bench_model(layers, width, val_images, image_size, patch_size,
                                          inv_temperature, seed, batch_size, device, dtype,
                                          show_progress)

    ref_model = copy.deepcopy(model)
    t0 = time.perf_counter()
    ref_sizes = reference_search(ref_model, scores, val, threshold, inv_temperature,
                                 show_progress=show_progress)
    ref_seconds = time.perf_counter() - t0
    runs: dict[str, tuple] = {}
    for key in ("full", "budget") * repeats:  # alternated; the fastest of each is kept
        if key == "full":
            limits = dict(cache_device_bytes=1 << 50)
        else:
            full_bytes = runs["full"][0].extra["cache_bytes"]["full"]
            budget = int(cache_mib * 2**20) if cache_mib is not None else full_bytes // 4
            limits = dict(cache_device_bytes=budget, cache_host_bytes=0, cache_disk_bytes=0)
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        result = AMPPruner(m, val[0][:1], imp, val, threshold, show_progress=show_progress,
                           **limits).step()
        seconds = time.perf_counter() - t0
        if key not in runs or seconds < runs[key][1]:
            runs[key] = (result, seconds, m)
    (full, full_seconds, greedy_model), (limited, limited_seconds, _) = (runs["full"],
                                                                         runs["budget"])
    # global allocation by KL at the MLP parameters the greedy search kept
    kept = full.mlp_params["after"] / full.mlp_params["before"]
    glob_model = copy.deepcopy(model)
    t0 = time.perf_counter()
    glob = AMPPruner(glob_model, val[0][:1], imp, val, threshold, show_progress=show_progress,
                     cache_device_bytes=1 << 50, measure="kl", allocation="global",
                     target={"mlp_params": kept}).step()
    glob_seconds = time.perf_counter() - t0
    hidden = next(iter(full.original_sizes.values()))
    attn, per_neuron = _block_costs(ref_model, val[0])
    bound = suffix_bound(full.trace, hidden, layers, attn, per_neuron, 6)
    full_bytes = full.extra["cache_bytes"]["full"]
    return {
        "layers": layers, "width": width, "hidden": hidden, "val_images": len(val) * len(val[0]),
        "val_batches": len(val), "image_size": image_size, "threshold": threshold,
        "identical_sizes": ref_sizes == full.hidden_sizes == limited.hidden_sizes,
        "identical_trace": full.trace == limited.trace, "reference_sizes": ref_sizes,
        "blocks_differing": sum(ref_sizes[n] != full.hidden_sizes[n] for n in ref_sizes),
        "reference_seconds": ref_seconds, "fast_seconds": full_seconds,
        "budget_seconds": limited_seconds, "speedup": ref_seconds / full_seconds,
        "budget_time_ratio": limited_seconds / full_seconds, "suffix_bound": bound,
        "evaluations": full.evaluations, "cache": full.cache, "budget_cache": limited.cache,
        "cache_full_bytes": full_bytes, "cache_budget_bytes": limits["cache_device_bytes"],
        "budget_peak_bytes": limited.extra["cache_bytes"]["peak"],
        "peak_fraction": limited.extra["cache_bytes"]["peak"] / full_bytes,
        "peak_fraction_bound": (math.sqrt(layers) + 2) / layers,
        "recomputed_blocks": limited.extra["recomputed_blocks"],
        "mlp_params": full.mlp_params, "hidden_sizes": full.hidden_sizes,
        "image_block_forwards": {"greedy": full.extra["image_block_forwards"],
                                 "reference": reference_block_forwards(
                                     full.trace, layers, len(val) * len(val[0])),
                                 "global": glob.extra["allocation"]["image_block_forwards"]},
        "global": {"hidden_sizes": glob.hidden_sizes, "mlp_params": glob.mlp_params,
                   "seconds": glob_seconds,
                   "curve_points": glob.extra["allocation"]["curve_points"],
                   "kl": glob.extra["allocation"]["verified"],
                   "greedy_kl": kl_to_original(model, greedy_model, val, inv_temperature)},
        "threads": torch.get_num_threads(), "repeats": repeats, "device": device_name(dev),
        "dtype": dtype,
    }


def _replayed(recording, option: tuple, trials: int, threshold: float, orders: int,
              cache: int, forwards: int, record: dict) -> dict:
    """One option (confidence, nearest, exact reference) replayed in `orders` batch orders;
    whether order 0 gave exactly the real run's forwards and record."""
    runs = []
    for order in range(orders):
        early = EarlyDecisions(option[0], trials=trials, nearest=option[1],
                               exact_reference=option[2], seed=order)
        r = replay(recording, early, threshold)
        n = r["image_block_forwards"]
        runs.append({"order": order, "identical": r["identical"],
                     "diverged_at": r["diverged_at"], "image_block_forwards": n,
                     "over_cache": None if n is None else n / cache,
                     "decided_early": (r["early_decisions"] or {}).get("decided_early")})
        if order == 0:
            matches = n == forwards and r["early_decisions"] == record
    return {"runs": runs, "order_0_is_the_run": matches}


def bench_early(layers: int = 12, width: int = 384, val_images: int = 1024,
                batch_size: int | None = 64, confidences: tuple[float, ...] = (0.99,),
                seeds: int = 1, seed: int = 0, image_size: int = 32, patch_size: int = 8,
                threshold: float = 2e-3, inv_temperature: float = 20.0, device: str = "cpu",
                dtype: str = "float32", show_progress: bool = True,
                pairings: tuple[str, ...] = ("nearest",),
                references: tuple[str, ...] = ("exact",), orders: int = 0) -> dict:
    """Counted cost of early decisions (`amp.search.confidence`) against the exact search,
    on `seeds` random-weight ViTs (seeds seed, seed+1, ...): image-block forwards of the
    reference procedure (counted from the exact search's decisions), of the exact search
    with the full state cache (today's), and of the search at each confidence and pairing
    (`nearest`: each trial paired with the nearest size of its block read in full, the
    default; `start`: always with the block's start) and E_prev's values (`exact`: each
    block's accepted size read on every batch, the default; `as-needed`: only where trials
    read), and whether each gives the exact search's sizes. Options are keyed "0.99"
    (nearest, exact), "0.99 start", "0.99 as-needed", "0.99 start as-needed". `orders`:
    each option is also replayed (`bench.replay`) in that many batch orders (seeds 0, 1,
    ...) on a recording of the exact search; order 0 is the real runs' own."""
    unknown = sorted(set(pairings) - {"nearest", "start"})
    if unknown or not pairings:
        raise ValueError(f"pairings: expected nearest and/or start, got {list(pairings)}")
    unknown = sorted(set(references) - {"exact", "as-needed"})
    if unknown or not references:
        raise ValueError(f"references: expected exact and/or as-needed, got {list(references)}")
    options = {" ".join([f"{c}"] + [w for w in (p, e) if w not in ("nearest", "exact")]):
               (c, p == "nearest", e == "exact")
               for c in confidences for p in pairings for e in references}
    rows = []
    for s in range(seed, seed + seeds):
        model, val, imp, _ = bench_model(layers, width, val_images, image_size, patch_size,
                                         inv_temperature, s, batch_size, device, dtype,
                                         show_progress)
        images = len(val) * len(val[0])
        runs = {}
        trials = 6 * len(find_mlps(vision_tower(model)[0]))  # AMPPruner's own split
        for key, option in {None: None, **options}.items():
            early = (None if option is None else
                     EarlyDecisions(option[0], trials=trials, nearest=option[1],
                                    exact_reference=option[2]))
            t0 = time.perf_counter()
            result = AMPPruner(copy.deepcopy(model), val[0][:1], imp, val, threshold,
                               show_progress=show_progress, cache_device_bytes=1 << 50,
                               confidence=early).step()
            runs[key] = (result, time.perf_counter() - t0)
        exact, exact_seconds = runs[None]
        cache = exact.extra["image_block_forwards"]
        recording = None
        if orders:
            recorder = RecordingDecisions()
            AMPPruner(copy.deepcopy(model), val[0][:1], imp, val, threshold,
                      show_progress=show_progress, cache_device_bytes=1 << 50,
                      confidence=recorder).step()
            recording = recorder.recording
        row = {"seed": s, "reference": reference_block_forwards(exact.trace, layers, images),
               "cache": cache, "cache_seconds": exact_seconds,
               "mlp_params_kept": exact.mlp_params["after"] / exact.mlp_params["before"],
               "trials": len(exact.trace), "options": {}}
        for key in options:
            result, seconds = runs[key]
            record = result.extra["early_decisions"]
            forwards = result.extra["image_block_forwards"]
            row["options"][key] = {
                "image_block_forwards": forwards, "over_cache": forwards / cache,
                "identical_sizes": result.hidden_sizes == exact.hidden_sizes,
                "blocks_differing": sum(result.hidden_sizes[n] != exact.hidden_sizes[n]
                                        for n in exact.hidden_sizes),
                "batches_read": record["batches_read"],
                "batches_full_passes": record["batches_full_passes"],
                "decided_early": record["decided_early"], "seconds": seconds}
            if recording is not None:
                row["options"][key]["orders"] = _replayed(
                    recording, options[key], trials, threshold, orders, cache, forwards,
                    record)
        if recording is not None:
            row["recorded_sizes_exact"] = recording.sizes == exact.hidden_sizes
        rows.append(row)
    summary = {}
    for key in options:
        summary[key] = {"over_cache": spread([r["options"][key]["over_cache"] for r in rows]),
                        "identical_seeds": sum(r["options"][key]["identical_sizes"]
                                               for r in rows)}
        if orders:
            replays = [o for r in rows for o in r["options"][key]["orders"]["runs"]]
            summary[key]["orders"] = {
                "replays": len(replays),
                "identical": sum(o["identical"] for o in replays),
                "over_cache": spread([o["over_cache"] for o in replays if o["identical"]])}
    return {"layers": layers, "width": width, "val_images": len(val) * len(val[0]),
            "val_batches": len(val), "threshold": threshold, "seeds": rows,
            "summary": summary, "threads": torch.get_num_threads(),
            "device": device_name(resolve_device(device)), "dtype": dtype}
