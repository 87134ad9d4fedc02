"""AMPImportance: first-order Taylor importance of MLP hidden neurons (docs/algorithm.md section 2).

    score_l[j] = mean over batches of  mean_b | sum_t a[b,t,j] * dE/da[b,t,j] |

with E a label-free criterion of the pooled features. The product is folded into the
score inside the backward pass by a tap on the hidden activation (the input of each MLP's
output linear, or the point `MLPView.tap` names), so no copy of the hidden activations of
all blocks is kept.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from ..utils.dist import all_reduce_sum, global_batch_size
from ..utils.finite import locate
from ..utils.progress import progress
from ..utils.tensors import device_of, require_materialized, split_batch, to_device
from .adapter import vision_tower
from .batches import as_batches, batch_images
from .convergence import ScoreConvergence
from .criterion import criterion_info, is_text
from .mlp import MLPView, find_mlps, list_mlp_kinds
from .tp import PackedGateLinear, PackedGatePruner, mark_packed_gates

FeatureFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


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


def _unprepared_gate(name: str) -> RuntimeError:
    return RuntimeError(
        f"{name} has a packed gate (gate and value in one linear) that Torch-Pruning would "
        "prune by halves: call amp.prepare(model) before building the dependency graph or "
        "pruner (accumulate() marks the gates too, but a pruner built before it does not "
        "see them), and pass customized_pruners=amp.customized_pruners()")


@dataclass
class ScoreState:
    """One rank's partial score sums (float64) after `batches` calibration batches, and
    the convergence checks so far when the pass has them."""

    sums: dict[str, torch.Tensor]
    batches: int
    converge: ScoreConvergence | None = None


class AMPImportance(tp.importance.Importance):
    """Taylor importance on a label-free entropy criterion, usable as a Torch-Pruning
    importance: called on the group of an MLP hidden layer it returns that layer's
    scores, and None on any other group (Torch-Pruning then leaves that group alone).
    The MLP of an attention-pool head (SigLIP, PE-Core) is scored but, as in AMPPruner,
    kept whole in Torch-Pruning scripts unless `prune_head=True`."""

    def __init__(
        self,
        inv_temperature: float = 20.0,
        criterion: str = "entropy",
        feature_fn: FeatureFn | None = None,
        use_abs: bool = True,
        show_progress: bool = True,
        prune_head: bool = False,
    ):
        if isinstance(inv_temperature, bool) or not isinstance(inv_temperature, numbers.Real):
            raise TypeError(f"inv_temperature: expected a positive number (e.g. 20.0), got "
                            f"{type(inv_temperature).__name__} {inv_temperature!r}")
        if not (math.isfinite(inv_temperature) and inv_temperature > 0):
            raise ValueError(f"inv_temperature: expected a positive finite number, got "
                             f"{inv_temperature!r}")
        if not isinstance(criterion, str):
            raise TypeError(f"criterion: expected the name of a registered criterion, got "
                            f"{type(criterion).__name__}")
        self.inv_temperature = float(inv_temperature)
        self.criterion_name = criterion
        self.info = criterion_info(criterion)
        self.criterion = self.info.build(inv_temperature)
        self.feature_fn = feature_fn
        self.use_abs = use_abs
        self.show_progress = show_progress
        self.prune_head = prune_head
        self._head: set[str] = set()
        self._scores: dict[str, torch.Tensor] = {}
        self._by_output: dict[nn.Module, tuple[str, MLPView]] = {}
        self._by_gate: dict[nn.Module, str] = {}
        self._by_output_name: dict[str, nn.Module] = {}
        self._shared: dict[tuple[nn.Module, str], tuple[str, MLPView]] = {}
        self.num_batches = 0

    # ---- scoring ------------------------------------------------------------------------
    def projects(self, extra) -> bool:
        """Whether this criterion compares features projected into the text space."""
        return self.info.projects(is_text(extra))

    def features(self, model: nn.Module, images: torch.Tensor, extra=None,
                 joint: bool | None = None) -> torch.Tensor:
        """Pooled features, projected into the text space where the criterion asks for
        batches carrying `extra` (or where `joint` says so)."""
        if self.feature_fn is not None:
            return self.feature_fn(model, images)
        tower, adapter = vision_tower(model)
        feats = adapter.features(tower, images)
        project = self.projects(extra) if joint is None else joint
        return adapter.project(tower, feats) if project else feats

    def accumulate(self, model: nn.Module, batches: Iterable, resume: ScoreState | None = None,
                   checkpoint: Callable[[ScoreState], None] | None = None, every: int = 0,
                   converge: ScoreConvergence | None = None) -> dict[str, torch.Tensor]:
        """Forward and backward over calibration `batches` with parameters frozen; adds the
        per-batch scores and returns the running mean ({MLP name: 1-D scores}).

        `batches`: a list, loader or iterable of batches, each a tensor of images
        (N, C, H, W) or an (images, extra) tuple; one tensor alone is one batch. Every batch
        holds 2 or more images (one image alone has a constant entropy: all scores 0), and
        at least one batch is read (an exhausted iterator is refused). The pass runs in eval
        mode with every parameter's requires_grad off (the gradient is taken with respect to
        the activations: a frozen model scores the same), both restored afterwards. A NaN
        or inf stops it with a `NonFiniteError` naming the batch and where it began. Scores
        add up over calls (a running mean; `reset()` starts over).

        `checkpoint(state)` receives this rank's partial sums and position every `every`
        batches; a pass resumed from that `state` over the batches after its position
        ends with the same scores, bit for bit.

        `converge`: stop before the end once the neurons each size the search can try would
        keep have not changed for a while (`ScoreConvergence`; where it stopped is in
        `converge.stopped`). A resumed pass takes the checks so far from `resume.converge`."""
        batches = as_batches(batches, "batches")
        tower, adapter = vision_tower(model)  # an unsupported family is named first
        require_materialized(model)
        mark_packed_gates(tower)  # a Torch-Pruning pruner built after this prunes them right
        views = find_mlps(tower)
        self._head = {n for n, v in views.items() if adapter.in_head(tower, v.module)}
        if not views:
            raise ValueError(f"no MLP found in {type(tower).__name__}: none of its modules has "
                             f"a known MLP layout ({', '.join(list_mlp_kinds())}); add one "
                             "with register_mlp_kind")
        device = device_of(model)
        sums = {n: torch.zeros(v.hidden, dtype=torch.float64) for n, v in views.items()}
        position = 0
        if resume is not None:
            sums = {n: resume.sums[n].clone() for n in views}
            position = resume.batches
            self.num_batches += resume.batches
            if converge is not None and resume.converge is not None:
                converge.restore(*resume.converge.state())
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
                    hook = v.tap.register_forward_pre_hook(self._tap(slots[n]))
                    stack.callback(hook.remove)
                batches = list(batches) if not hasattr(batches, "__len__") else batches
                for batch in progress(batches, "AMP scoring", enabled=self.show_progress,
                                      unit="img", status=f"from batch {position}"):
                    images, extra = batch_images(batch, position, "batches")
                    # detach(): the caller's own tensor keeps requires_grad as it was
                    images = images.to(device).detach().requires_grad_(True)
                    extra = to_device(extra, device)
                    for s in slots.values():
                        s.zero_()
                    loss = self.criterion(self.features(model, images, extra), extra)
                    loss.backward()
                    if not self._finite(loss, slots):
                        raise self._locate(model, tower, batch, position)
                    n_global = global_batch_size(images.shape[0])
                    for n in views:
                        sums[n] += slots[n].double().cpu() / n_global
                    self.num_batches += 1
                    position += 1
                    stop = converge is not None and converge.due(position) and converge.check(
                        position, {n: all_reduce_sum(sums[n]) + previous.get(n, 0)
                                   for n in views})
                    if checkpoint is not None and every and position % every == 0:
                        checkpoint(ScoreState(sums, position, converge))
                    if stop:
                        break
        finally:
            for p, flag in frozen:
                p.requires_grad_(flag)
            model.train(was_training)
        if position == 0:
            raise ValueError("batches: no batch (an empty list, or an iterator already read to "
                             "its end)")
        sums = {n: all_reduce_sum(s) for n, s in sums.items()}
        for n, s in previous.items():
            sums[n] += s
        self._scores = {n: (s / max(self.num_batches, 1)).float() for n, s in sums.items()}
        self._index(views)
        return self.neuron_scores()

    @staticmethod
    def _finite(loss: torch.Tensor, slots: dict[str, torch.Tensor]) -> bool:
        # one value (one device sync per batch): non-finite if any score or the loss is
        total = loss.detach().double() + sum(s.sum(dtype=torch.float64) for s in slots.values())
        return bool(torch.isfinite(total))

    def _locate(self, model: nn.Module, tower: nn.Module, batch, index: int):
        """The NonFiniteError naming calibration batch `index` and where NaN/inf began."""
        device = device_of(model)

        def forward(b):
            images, extra = split_batch(b)
            return self.features(model, images.to(device), to_device(extra, device))
        return locate("score", tower, [batch], "calibration", forward, first=index)

    def _check_packed_gates(self, group) -> None:
        """Refuse a group that reaches a packed gate linear (gate and value in one linear)
        other than through AMP's PackedGatePruner linked to the MLP's output linear: the
        graph was built before the gate was marked, and would prune the gate by halves or,
        having lost the link to the output linear, leave the MLP whole without a word."""
        targets = {(dep.target.module, dep.handler.__name__) for dep, _ in group}
        for dep, _ in group:
            name = self._by_gate.get(dep.target.module)
            if name is None or dep.handler.__name__ != "prune_out_channels":
                continue
            output = self._by_output_name[name]
            if not isinstance(getattr(dep.handler, "__self__", None), PackedGatePruner) or (
                    output, "prune_in_channels") not in targets:
                raise _unprepared_gate(name)

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
            tower, adapter = vision_tower(model)
            views = find_mlps(tower)
            self._index(views)
            self._head = {n for n, v in views.items() if adapter.in_head(tower, v.module)}
        return self

    def reset(self) -> None:
        self._scores, self.num_batches = {}, 0
        self._index({})

    def _index(self, views: dict[str, MLPView]) -> None:
        """The MLPs scored, by the modules Torch-Pruning's groups name: output linears
        (whose input channels are the hidden neurons), packed gate linears, and the linears
        an MLP shares with attention (no group of Torch-Pruning's holds its neurons alone)."""
        self._by_output = {v.output: (n, v) for n, v in views.items() if v.graph_pruned}
        self._by_gate = {v.inputs[0]: n for n, v in views.items() if v.packed}
        self._by_output_name = {n: v.output for n, v in views.items()}
        self._shared = {(lin, fn): (n, v) for n, v in views.items() if not v.graph_pruned
                        for lin, fn in [*((i, "prune_out_channels") for i in v.inputs),
                                        (v.output, "prune_in_channels")]}

    def _check_shared(self, group) -> None:
        """Refuse a group that removes channels of linears an MLP shares with attention: the
        group cannot keep attention's channels apart from the MLP's neurons."""
        for dep, _ in group:
            hit = self._shared.get((dep.target.module, dep.handler.__name__))
            if hit is not None:
                name, view = hit
                raise RuntimeError(f"{name}: {view.fused_reason()}; Torch-Pruning's groups "
                                   "cannot remove its hidden neurons alone: prune it with "
                                   "amp.AMPPruner")

    # ---- Torch-Pruning protocol ---------------------------------------------------------
    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        if not self._by_output_name:
            raise RuntimeError("AMPImportance has no scores: run importance.accumulate(model, "
                               "calibration_batches) before the pruner's step() (or "
                               "load_scores(scores, model))")
        self._check_packed_gates(group)
        self._check_shared(group)
        for i, (dep, idxs) in enumerate(group):
            layer = dep.target.module
            if layer not in self._by_output or dep.handler.__name__ != "prune_in_channels":
                continue
            name, view = self._by_output[layer]
            if name in self._head and not self.prune_head:
                return None
            if view.packed and not isinstance(view.inputs[0], PackedGateLinear):
                raise _unprepared_gate(name)
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
