"""AMPImportance: first-order Taylor importance of MLP hidden neurons (ALGORITHM.md 2).

    score_l[j] = mean over batches of  mean_b | sum_t a[b,t,j] * dE/da[b,t,j] |

with E a label-free criterion of the pooled features. The product is folded into the
score inside the backward pass by a tap at the input of each MLP's output linear, so
no copy of the hidden activations of all blocks is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import ExitStack

import torch
import torch.distributed as dist
import torch_pruning as tp
from torch import nn

from .adapters import vision_tower
from .criterion import make_criterion
from .mlp import find_mlps
from .progress import progress

FeatureFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def split_batch(batch) -> tuple[torch.Tensor, object]:
    """(images, extra) from a tensor or a tuple/list whose first element is the images."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise TypeError(f"a batch must be a tensor or a (images, ...) tuple, got {type(batch)}")


def is_text(extra) -> bool:
    """Text features ride along with image-text batches (labels are integers)."""
    return isinstance(extra, torch.Tensor) and extra.is_floating_point()


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_batch_size(local: int, device: torch.device) -> int:
    if _world() == 1:
        return local
    n = torch.tensor([local], device=device, dtype=torch.long)
    dist.all_reduce(n)
    return int(n.item())


class _TaylorTap(torch.autograd.Function):
    """Identity whose backward adds sum_b |sum_t a * g| (per neuron) into `slot`."""

    @staticmethod
    def forward(ctx, a, slot, use_abs):
        ctx.save_for_backward(a)
        ctx.slot, ctx.use_abs = slot, use_abs
        return a.view_as(a)

    @staticmethod
    def backward(ctx, g):
        (a,) = ctx.saved_tensors
        per_image = (a.float() * g.float()).flatten(1, -2).sum(dim=1)  # (B, H)
        if ctx.use_abs:
            per_image = per_image.abs()
        ctx.slot.add_(per_image.sum(dim=0))
        return g, None, None


class AMPImportance(tp.importance.Importance):
    """Taylor importance on a label-free entropy criterion, usable as a Torch-Pruning
    importance: called on the group of an MLP hidden layer it returns that layer's
    scores, and None on any other group (Torch-Pruning then leaves that group alone)."""

    def __init__(
        self,
        inv_temperature: float = 20.0,
        criterion: str = "entropy",
        feature_fn: FeatureFn | None = None,
        use_abs: bool = True,
        show_progress: bool = True,
    ):
        self.inv_temperature = inv_temperature
        self.criterion_name = criterion
        self.criterion = make_criterion(criterion, inv_temperature)
        self.feature_fn = feature_fn
        self.use_abs = use_abs
        self.show_progress = show_progress
        self._scores: dict[str, torch.Tensor] = {}
        self._by_output: dict[nn.Module, str] = {}
        self.num_batches = 0

    # ---- scoring ------------------------------------------------------------------------
    def features(self, model: nn.Module, images: torch.Tensor, joint: bool = False
                 ) -> torch.Tensor:
        """Pooled features; `joint`: projected into the text space (image-text criteria)."""
        if self.feature_fn is not None:
            return self.feature_fn(model, images)
        tower, adapter = vision_tower(model)
        feats = adapter.features(tower, images)
        return adapter.project(tower, feats) if joint else feats

    def accumulate(self, model: nn.Module, batches: Iterable) -> dict[str, torch.Tensor]:
        """Forward and backward over calibration `batches` with parameters frozen; adds the
        per-batch scores and returns the running mean ({MLP name: 1-D scores})."""
        tower, _ = vision_tower(model)
        views = find_mlps(tower)
        if not views:
            raise ValueError(f"no MLP found in {type(tower).__name__}")
        device = next(model.parameters()).device
        sums = {n: torch.zeros(v.hidden, dtype=torch.float64) for n, v in views.items()}
        previous = {n: s.double() * self.num_batches for n, s in self._scores.items()}
        slots = {n: torch.zeros(v.hidden, dtype=torch.float32, device=device)
                 for n, v in views.items()}
        frozen = [(p, p.requires_grad) for p in model.parameters()]
        was_training = model.training
        model.eval()
        try:
            with ExitStack() as stack:
                for p, _ in frozen:
                    p.requires_grad_(False)
                for n, v in views.items():
                    hook = v.output.register_forward_pre_hook(self._tap(slots[n]))
                    stack.callback(hook.remove)
                batches = list(batches) if not hasattr(batches, "__len__") else batches
                for batch in progress(batches, "AMP scoring", enabled=self.show_progress):
                    images, extra = split_batch(batch)
                    images = images.to(device).requires_grad_(True)
                    if isinstance(extra, torch.Tensor):
                        extra = extra.to(device)
                    for s in slots.values():
                        s.zero_()
                    loss = self.criterion(self.features(model, images, is_text(extra)), extra)
                    loss.backward()
                    n_global = global_batch_size(images.shape[0], device)
                    for n in views:
                        sums[n] += slots[n].double().cpu() / n_global
                    self.num_batches += 1
        finally:
            for p, flag in frozen:
                p.requires_grad_(flag)
            model.train(was_training)
        if _world() > 1:
            for n in sums:
                t = sums[n].to(device)
                dist.all_reduce(t)
                sums[n] = t.cpu()
        for n, s in previous.items():
            sums[n] += s
        self._scores = {n: (s / max(self.num_batches, 1)).float() for n, s in sums.items()}
        self._by_output = {v.output: n for n, v in views.items()}
        return self.neuron_scores()

    def _tap(self, slot: torch.Tensor):
        use_abs = self.use_abs

        def hook(_module, args):
            (a, *rest) = args
            return (_TaylorTap.apply(a, slot, use_abs), *rest)
        return hook

    def neuron_scores(self) -> dict[str, torch.Tensor]:
        return {n: s.clone() for n, s in self._scores.items()}

    def load_scores(self, scores: dict[str, torch.Tensor], model: nn.Module | None = None):
        """Use precomputed scores (e.g. from a scores file) instead of `accumulate`."""
        self._scores = {n: s.float().cpu() for n, s in scores.items()}
        self.num_batches = max(self.num_batches, 1)
        if model is not None:
            tower, _ = vision_tower(model)
            self._by_output = {v.output: n for n, v in find_mlps(tower).items()}
        return self

    def reset(self) -> None:
        self._scores, self.num_batches = {}, 0

    # ---- Torch-Pruning protocol ---------------------------------------------------------
    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        for i, (dep, idxs) in enumerate(group):
            layer = dep.target.module
            if layer not in self._by_output or dep.handler.__name__ != "prune_in_channels":
                continue
            name = self._by_output[layer]
            scores = self._scores[name]
            if len(scores) != layer.in_features:
                raise RuntimeError(
                    f"scores of {name} cover {len(scores)} neurons but the layer now has "
                    f"{layer.in_features}; call accumulate() again after pruning"
                )
            out = torch.zeros(len(group[0].idxs))
            out[torch.as_tensor(group[i].root_idxs)] = scores[torch.as_tensor(idxs)]
            return out
        return None
