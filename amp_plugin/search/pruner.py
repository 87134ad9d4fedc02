"""AMPPruner: adaptive per-MLP sizes by binary search on the entropy (docs/algorithm.md section 3),
pruned physically through Torch-Pruning's dependency graph as each size is decided.

The loop itself is `search.adaptive_search`; here a candidate is applied by masking the
hidden neurons at the input of the output linear where that is exact (a sliced copy of
the MLP across a norm over the hidden dim), and a size is committed through the graph.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ..core.adapter import vision_tower
from ..core.batches import check_val_batches, reiterable
from ..core.cost import count_flops, count_mlp_params, count_params
from ..core.importance import AMPImportance
from ..core.mlp import MLPView, find_mlps
from ..core.tp import mlp_graph, mlp_inputs, prune_mlp
from ..utils.finite import NonFiniteError
from ..utils.tensors import device_of, require_materialized
from .allocation import GlobalAllocation, global_allocation
from .budget import SizeModel, Target, budget_search
from .cache import StateCache
from .greedy import (
    HEAD_KEPT,
    NOT_SELECTED,
    EntropyEval,
    PruneResult,
    SearchState,
    adaptive_search,
    check_search_args,
    head_mlps,
    kept_neurons,
    tower_mlps,
)
from .measures import DEFAULT_MEASURE, SearchMeasure, make_measure
from .sequential import EarlyDecisions


@contextmanager
def masked_or_sliced(tower: nn.Module, view: MLPView, keep: torch.Tensor):
    """Temporarily keep only neurons `keep` of `view` (mask or sliced copy)."""
    if view.exact_masking:
        mask = torch.zeros(view.hidden, device=view.output.weight.device)
        mask[keep] = 1.0

        def hook(_m, args):
            return (args[0] * mask.to(args[0].dtype), *args[1:])
        handle = view.tap.register_forward_pre_hook(hook)
        try:
            yield
        finally:
            handle.remove()
    else:
        parent_name, _, child = view.name.rpartition(".")
        parent = tower.get_submodule(parent_name) if parent_name else tower
        original = getattr(parent, child)
        setattr(parent, child, view.sliced_copy(keep))
        try:
            yield
        finally:
            setattr(parent, child, original)


class AMPPruner:
    """Adaptive MLP pruning of a vision transformer through Torch-Pruning.

    `step()` searches every block MLP (or the MLPs named in `mlps`) from the last block to
    the first, prunes it physically through Torch-Pruning's dependency graph as soon as its
    size is decided, and returns a `PruneResult`. The MLP of an attention-pool head
    (SigLIP, PE-Core) is not a block MLP: it is kept whole and listed in
    `PruneResult.kept_whole`, unless `search_head=True` (searched first, before the last
    block) or `mlps` names it.

        imp = AMPImportance(inv_temperature=20)
        imp.accumulate(model, calib_batches)
        result = AMPPruner(model, example_inputs, imp, val_batches, threshold=5e-3).step()

    With `target` (a `Target` or e.g. {"mlp_params": 0.6}) the threshold is searched instead
    (budget mode, `search.budget`): every search runs on masks over the same cached states,
    `threshold` is where the bisection starts, and only the final sizes are pruned.

    `val_batches`: a list or a re-iterable loader of batches (tensors of images, or
    (images, extra) tuples), every one of 2 or more images and of one shape (E_val is a
    mean over batches of an entropy that depends on the batch size); one tensor is one
    batch, an iterator is read into a list once. The search runs in eval mode whatever
    the model's mode (restored afterwards) and needs no gradients (frozen parameters
    change nothing). The scores must be those of this model as it is: a model pruned
    since, or a second `step()`, is refused; so is a model on the meta device.

    `measure` names what the search bounds or minimises (`search.measures`: "entropy_rise",
    the authors' rule and the default, "kl", "cosine"). `allocation="global"` (or
    `GlobalAllocation` settings) decides every size at once from per-block distortion
    curves (`search.allocation`): with `target`, the least summed distortion that meets it;
    without, the largest cut whose summed distortion stays <= `threshold`. Only the final
    sizes are pruned; `PruneResult.extra["allocation"]` records the curves, the sizes and
    the predicted and verified distortion.

        AMPPruner(model, example, imp, val, 0.0, measure="kl", allocation="global",
                  target={"mlp_params": 0.3}).step()

    `confidence` (greedy search with a threshold only): a trial stops reading validation
    batches once a sequential bound decides it at this confidence for the whole search
    (`search.sequential`); None, the default, reads every batch. The batches each trial read
    are in `PruneResult.extra["early_decisions"]`. An `EarlyDecisions` sets the error per
    trial, the batches read first and the order itself. `exact_reference=False` (with a
    float `confidence`): E_prev's per-batch values only where trials read them
    (`EarlyDecisions.exact_reference`).
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: torch.Tensor,
        importance: AMPImportance,
        val_batches: Sequence,
        threshold: float,
        max_steps: int = 6,
        round_to: int | None = None,
        feature_fn: Callable | None = None,
        cache_device_bytes: int = 2 << 30,
        cache_host_bytes: int = 8 << 30,
        cache_dir: str | None = None,
        show_progress: bool = True,
        log: Callable[[str], None] | None = None,
        mlps: Sequence[str] | None = None,
        cache_disk_bytes: int | None = None,
        resume: SearchState | None = None,
        on_decided: Callable[[SearchState], None] | None = None,
        search_head: bool = False,
        target: Target | Mapping | None = None,
        measure: str | SearchMeasure = DEFAULT_MEASURE,
        allocation: str | GlobalAllocation | Mapping = "greedy",
        confidence: float | EarlyDecisions | None = None,
        exact_reference: bool = True,
    ):
        check_search_args(threshold, max_steps, round_to)
        if confidence is not None:
            if not isinstance(confidence, EarlyDecisions):
                EarlyDecisions(confidence)  # a value outside (0, 1) fails here
            if target is not None or GlobalAllocation.parse(allocation) is not None:
                raise ValueError("confidence applies to the greedy search with a threshold "
                                 "(no target, allocation greedy)")
        self.confidence, self.exact_reference = confidence, exact_reference
        self.target = Target.parse(target) if target is not None else None
        if target is not None and resume is not None:
            raise ValueError("a budget search (target) is not resumable: resume=None")
        if not isinstance(importance, AMPImportance):
            raise TypeError(f"importance: expected an AMPImportance, got "
                            f"{type(importance).__name__}")
        vision_tower(model)  # an unsupported family is named before anything else
        require_materialized(model)
        val_batches = reiterable(val_batches, "val_batches")
        if isinstance(val_batches, (list, tuple)):  # a stream is checked as it is read
            check_val_batches(val_batches, "val_batches")
        self.stepped = False
        self.measure = make_measure(measure, importance)  # an unknown name fails here
        self.allocation = GlobalAllocation.parse(allocation)
        if self.allocation is not None and resume is not None:
            raise ValueError("a global allocation is not resumable: resume=None")
        self.model = model
        self.example_inputs = example_inputs
        self.importance = importance
        self.feature_fn = feature_fn
        self.val_batches = val_batches  # a list, or a loader streaming them
        self.threshold = threshold
        self.max_steps = max_steps
        self.round_to = round_to
        self.cache_limits = (cache_device_bytes, cache_host_bytes, cache_dir, cache_disk_bytes)
        self.resume, self.on_decided = resume, on_decided
        self.cache: StateCache | None = None
        self.show_progress = show_progress
        self.log = log or (lambda msg: None)
        self.mlps = list(mlps) if mlps is not None else None
        self.search_head = search_head
        vision_tower(model)  # refuses a model AMP cannot prune before any work

    def _scores(self, views: dict[str, MLPView]) -> dict[str, torch.Tensor]:
        scores = self.importance.neuron_scores()
        missing = [n for n in views if n not in scores]
        if missing:
            raise ValueError(f"no scores for {missing[:3]}...; run importance.accumulate() first")
        for n, v in views.items():
            if len(scores[n]) != v.hidden:
                raise ValueError(f"scores of {n} have {len(scores[n])} entries, the MLP has "
                                 f"{v.hidden} neurons: the model was pruned after the scores "
                                 "were computed; run importance.accumulate(model, ...) again")
            if not bool(torch.isfinite(scores[n]).all()):
                raise NonFiniteError(f"scores of {n} hold NaN or inf values")
        return scores

    @torch.no_grad()
    def step(self) -> PruneResult:
        """Search and prune once; a second call is refused (the model is pruned by then)."""
        if self.stepped:
            raise RuntimeError("step() was already called: the model is pruned; to prune it "
                               "further, accumulate new scores and build a new AMPPruner")
        t0 = time.perf_counter()
        tower, _ = vision_tower(self.model)
        views = tower_mlps(self.model, self.mlps, self.search_head)
        head = set(head_mlps(self.model))
        scores = self._scores(views)
        self.stepped = True
        was_training = self.model.training
        self.model.eval()
        example = self.example_inputs.to(device_of(self.model))
        before = dict(params=count_params(tower), mlp=count_mlp_params(tower),
                      flops=count_flops(tower, example))
        original = {n: v.hidden for n, v in find_mlps(tower).items()}
        kept_whole = {n: HEAD_KEPT if n in head and self.mlps is None else NOT_SELECTED
                      for n in original if n not in views}
        if kept_whole:
            self.log(f"kept whole: {', '.join(f'{n} ({r})' for n, r in kept_whole.items())}")
        inputs = mlp_inputs(tower, example, views)
        pending = {n: v for n, v in views.items()
                   if self.resume is None or n not in self.resume.sizes}
        # built on the original model: the states entering the pending MLPs' blocks do not
        # depend on the decided (later) ones, and a measure's original references must not
        self.cache = StateCache(*self.cache_limits)
        evaluate = EntropyEval(self.model, self.importance, self.val_batches, pending,
                               self.cache, self.show_progress, self.feature_fn, self.measure)
        self.log(f"validation states cached: {evaluate.mode}")
        if self.resume is not None:  # a resumed search: the decided sizes, as decided
            for name, size in self.resume.sizes.items():
                commit_keep = kept_neurons(scores[name], size)
                if commit_keep is not None:
                    prune_mlp(mlp_graph(views[name], inputs[name]), views[name], commit_keep)
            self.log(f"search resumed after {len(self.resume.sizes)} decided MLPs")

        def commit(name: str, view: MLPView, keep: torch.Tensor | None) -> None:
            if keep is not None:
                prune_mlp(mlp_graph(view, inputs[name]), view, keep)

        def candidate(name, view, keep):
            return masked_or_sliced(tower, view, keep)
        index_of = {n: i for i, n in enumerate(original)}
        threshold, extra = self.threshold, {}
        try:
            if self.allocation is not None:
                out = global_allocation(
                    views, scores, evaluate, candidate, SizeModel(tower, views, example),
                    self.allocation, self.threshold, self.target, self.round_to, index_of,
                    self.show_progress, self.log)
                for name in list(views)[::-1]:  # only the sizes allocated are pruned
                    commit(name, views[name], out.keep[name])
                evaluations, extra = out.evaluations, {"allocation": out.record}
            elif self.target is None:
                early = self.confidence
                if early is not None and not isinstance(early, EarlyDecisions):
                    early = EarlyDecisions(early, trials=self.max_steps * len(views),
                                           exact_reference=self.exact_reference)
                out = adaptive_search(
                    views, scores, evaluate, candidate, commit, threshold=self.threshold,
                    max_steps=self.max_steps, round_to=self.round_to, index_of=index_of,
                    show_progress=self.show_progress, resume=copy.deepcopy(self.resume),
                    on_decided=self.on_decided, early=early)
                evaluations = out.evaluations
                if out.early is not None:
                    extra["early_decisions"] = out.early
            else:
                budget = budget_search(
                    views, scores, evaluate, candidate, self.target,
                    SizeModel(tower, views, example), self.threshold, self.max_steps,
                    self.round_to, index_of, self.show_progress, self.log)
                for name in list(views)[::-1]:  # only the sizes found are pruned
                    commit(name, views[name], budget.keep[name])
                out, threshold = budget.outcome, budget.threshold
                evaluations = sum(it.evaluations for it in budget.iterations)
                extra = {"budget": budget.to_dict()}
            entropy = out.entropy
            if self.allocation is None and self.measure.name != DEFAULT_MEASURE:
                # the search's values are the measure's: the entropy is reported beside it
                value, after = evaluate.values("", None, entropy=True)
                extra["measure"] = {"name": self.measure.name, **out.entropy, "final": value}
                entropy = {"before": evaluate.original_entropy, "after": after}
            extra["image_block_forwards"] = evaluate.image_block_forwards
        finally:
            evaluate.close()
            self.model.train(was_training)
        return PruneResult(
            hidden_sizes={n: v.hidden for n, v in find_mlps(tower).items()},
            original_sizes=original,
            trace=getattr(out, "trace", []),
            params=dict(before=before["params"], after=count_params(tower)),
            mlp_params=dict(before=before["mlp"], after=count_mlp_params(tower)),
            flops=dict(before=before["flops"], after=count_flops(tower, example)),
            entropy=entropy,
            threshold=threshold,
            max_steps=self.max_steps,
            round_to=self.round_to,
            evaluations=evaluations,
            cache=evaluate.mode,
            seconds=time.perf_counter() - t0,
            extra={**extra, "cache_bytes": dict(full=self.cache.full_bytes,
                                                peak=self.cache.peak_bytes),
                   "recomputed_blocks": self.cache.recomputed_blocks},
            kept_whole=kept_whole,
        )
