"""The distillation schedule: linear warm-up then cosine learning rate, and a cosine weight
decay, stepped per optimizer step."""

from __future__ import annotations

import functools
import math

from torch import nn
from torch.optim.lr_scheduler import LambdaLR


def cosine(start: float, end: float, progress_: float) -> float:
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(max(progress_, 0.0), 1.0)))


def warmup_cosine(step: int, warmup: int, total: int, floor: float) -> float:
    """lr factor of 0-based optimizer step `step`: linear warm-up to 1, cosine to `floor`."""
    if step < warmup:
        return (step + 1) / warmup
    return cosine(1.0, floor, (step - warmup) / max(1, total - warmup))


class WarmupCosine(LambdaLR):
    """The lr schedule plus a cosine weight decay, stepped by DeepSpeed after every
    optimizer step and saved in its checkpoints.

    Written here because DeepSpeed's WarmupCosineLR keeps lr at 0 for the first two
    steps, and neither DeepSpeed nor torch schedules weight decay.
    """

    def __init__(self, optimizer, total: int, warmup: int, floor: float,
                 weight_decay: tuple[float, float]):
        self.total, self.weight_decay = total, tuple(weight_decay)
        lr = functools.partial(warmup_cosine, warmup=warmup, total=total, floor=floor)
        super().__init__(optimizer, lr)

    def current_weight_decay(self) -> float:
        return cosine(self.weight_decay[0], self.weight_decay[1],
                      self.last_epoch / max(1, self.total))

    def step(self, epoch=None):
        super().step(epoch)
        wd = self.current_weight_decay()
        for group in self.optimizer.param_groups:
            if group.get("decay", False):
                group["weight_decay"] = wd


def param_groups(module: nn.Module, no_decay: set[str], weight_decay: float,
                 exempt: bool = False) -> list[dict]:
    """Optimizer groups tagged for the WD schedule: every trainable parameter decays (the
    authors' distillation), or with `exempt` timm's split (no decay on biases, norms and
    the parameters named in `no_decay`)."""
    if not exempt:
        params = [p for p in module.parameters() if p.requires_grad]
        return [{"params": params, "weight_decay": weight_decay, "decay": True}] if params else []
    from timm.optim import param_groups_weight_decay

    groups = param_groups_weight_decay(module, weight_decay, no_weight_decay_list=no_decay)
    for g in groups:
        g["decay"] = g["weight_decay"] > 0
        g["weight_decay"] = weight_decay if g["decay"] else 0.0
    return [g for g in groups if g["params"]]
