"""Run the chosen eval tasks on each model (original, pruned, distilled)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from ..config import EvalConfig
from ..core.adapter import vision_tower
from ..core.cost import count_flops, count_mlp_params, count_params
from .base import EvalContext, get_task, resolved_tasks
from .labelled import ORIGINAL


def evaluate_models(cfg: EvalConfig, models: Mapping[str, Callable[[], nn.Module]],
                    ctx: EvalContext, tasks: Sequence[str] | None = None) -> dict:
    """{"models": sizes per role, <task section>: results per role, "tasks", "eval_seconds"}
    for the models `models` ({role: loader}); the original ("teacher") is evaluated first,
    so the tasks that compare with it find its features. Every task is checked on the
    first model before any evaluation starts."""
    names = list(tasks) if tasks else resolved_tasks(cfg)
    chosen = [get_task(t) for t in names]
    models = dict(sorted(models.items(), key=lambda item: item[0] != ORIGINAL))
    ctx.roles = tuple(models)
    t0 = time.perf_counter()
    size = cfg.throughput.image_size or ctx.data.image_size
    results: dict = {"models": {}}
    held: dict[str, nn.Module] = {}  # for the joint tasks, which see every model at once
    for i, (role, load) in enumerate(models.items()):
        model = load().to(ctx.device).float().eval()
        if i == 0:
            check_tasks(cfg, ctx, model, names)
        tower, _ = vision_tower(model)
        example = torch.zeros(1, 3, size, size, device=ctx.device)
        results["models"][role] = {"params": count_params(tower),
                                   "mlp_params": count_mlp_params(tower),
                                   "flops": count_flops(model, example)}
        for task in chosen:
            if not task.joint:
                _store(results, task, role, task.run(model, role, cfg, ctx))
        if any(task.joint for task in chosen):
            held[role] = model.cpu() if ctx.device.type == "cuda" else model
        del model
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    for task in chosen:
        if task.joint:
            for role, out in task.run_joint(held, cfg, ctx).items():
                _store(results, task, role, out)
    for task in chosen:
        task.finish(results.get(task.section(), {}), results["models"])
    results["tasks"] = names
    results["eval_seconds"] = time.perf_counter() - t0
    return results


def check_tasks(cfg: EvalConfig, ctx: EvalContext, model: nn.Module,
                tasks: Sequence[str] | None = None) -> None:
    """Each chosen task's check on `model` (the first evaluated, normally the original):
    ValueError naming the task and what it misses, before any evaluation work."""
    for name in (list(tasks) if tasks else resolved_tasks(cfg)):
        get_task(name).check(cfg, ctx, model)


def _store(results: dict, task, role: str, out) -> None:
    section = results.setdefault(task.section(), {})
    if task.per_dataset:
        for dataset, value in out.items():
            section.setdefault(dataset, {})[role] = value
    else:
        section[role] = out
