"""`amp bench scoring`: where scoring with `amp.score_convergence` stops, and whether the
search decides the same sizes from its scores as from a whole pass.

Per seed: a random-weight ViT, a whole calibration pass, then a pass per tolerance that
stops once the buckets of `core.convergence` settle; the exact greedy search (full state
cache) runs on the whole pass's scores and on each stopped pass's scores, on the same
validation batches.
"""

from __future__ import annotations

import copy
import time

import torch

from ..core.adapter import vision_tower
from ..core.convergence import ScoreConvergence, buckets, search_sizes
from ..core.importance import AMPImportance
from ..core.mlp import find_mlps
from ..data import batches
from ..evaluate.throughput import device_name
from ..search.pruner import AMPPruner
from ..utils.stats import spread
from .search import bench_images, bench_vit


def bench_scoring(layers: int = 12, width: int = 64, calib_images: int = 4096,
                  val_images: int = 512, batch_size: int = 32, every: int = 4,
                  patience: int = 3, tolerances: tuple[float, ...] = (0.0, 0.01),
                  threshold: float = 2e-3, inv_temperature: float = 20.0, seeds: int = 1,
                  seed: int = 0, image_size: int = 32, patch_size: int = 8,
                  show_progress: bool = True) -> dict:
    """Per seed and tolerance: calibration batches read, neurons whose bucket differs from
    the whole pass's, and whether the exact search keeps the whole pass's sizes."""
    images = bench_images(val_images + calib_images, image_size)
    val = batches(images[:val_images], batch_size)
    calib = batches(images[val_images:], batch_size)
    rows = []
    for s in range(seed, seed + seeds):
        model = bench_vit(layers, width, image_size, patch_size, s)

        def search(imp: AMPImportance) -> dict[str, int]:
            return AMPPruner(copy.deepcopy(model), val[0][:1], imp, val, threshold,
                             show_progress=show_progress,
                             cache_device_bytes=1 << 50).step().hidden_sizes

        whole = AMPImportance(inv_temperature, show_progress=show_progress)
        t0 = time.perf_counter()
        full_scores = whole.accumulate(model, calib)
        row = {"seed": s, "batches": len(calib), "whole_seconds": time.perf_counter() - t0,
               "neurons": sum(len(v) for v in full_scores.values()), "options": {}}
        exact = search(whole)
        for tol in tolerances:
            converge = ScoreConvergence(every, patience, tol)
            imp = AMPImportance(inv_temperature, show_progress=show_progress)
            t0 = time.perf_counter()
            scores = imp.accumulate(model, calib, converge=converge)
            seconds = time.perf_counter() - t0
            tried = {n: search_sizes(len(v)) for n, v in full_scores.items()}
            moved = sum(int((buckets(scores[n], tried[n]) != buckets(v, tried[n])).sum())
                        for n, v in full_scores.items())
            sizes = search(imp) if converge.stopped is not None else exact
            row["options"][str(tol)] = {
                "stopped": converge.stopped, "batches_read": imp.num_batches,
                "read_fraction": imp.num_batches / len(calib), "seconds": seconds,
                "neurons_moved": moved, "identical_sizes": sizes == exact,
                "blocks_differing": sum(sizes[n] != exact[n] for n in exact),
                "history": [list(h) for h in converge.history]}
        rows.append(row)
    summary = {}
    for tol in map(str, tolerances):
        summary[tol] = {"read_fraction": spread([r["options"][tol]["read_fraction"]
                                                 for r in rows]),
                        "identical_seeds": sum(r["options"][tol]["identical_sizes"]
                                               for r in rows)}
    blocks = len(find_mlps(vision_tower(model)[0]))
    return {"layers": layers, "width": width, "mlps": blocks, "calib_images": calib_images,
            "val_images": val_images, "batch_size": batch_size, "every": every,
            "patience": patience, "threshold": threshold, "seeds": rows, "summary": summary,
            "threads": torch.get_num_threads(), "device": device_name(torch.device("cpu"))}
