"""AMP inside NNI 3.0 (`nni.compression`): `AMPNNIPruner`, an NNI `Pruner` whose masks
are AMP's adaptive MLP sizes (docs/algorithm.md section 3). It is built NNI-style from
`(model, config_list, ...)` and `compress()` returns `(model, masks)` in NNI's format, so
NNI scripts use it like `L1NormPruner`. The search is AMP's own loop
(`search.greedy.adaptive_search`); only applying a candidate (NNI masks) differs from
`AMPPruner`. `apply_nni_masks` then makes the model physically smaller.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from nni.compression.base.compressor import Pruner
from nni.compression.base.config import select_modules_by_config
from nni.compression.base.setting import PruningSetting
from nni.compression.base.wrapper import ModuleWrapper
from nni.compression.utils import Evaluator
from torch import nn

from ..core.adapter import vision_tower
from ..core.importance import AMPImportance
from ..core.mlp import MLPView, find_mlps
from ..core.tp import PackedGateLinear, mark_packed_gates
from ..search.budget import SizeModel, Target, budget_search
from ..search.cache import StateCache
from ..search.greedy import (
    HEAD_KEPT,
    NOT_SELECTED,
    EntropyEval,
    PruneResult,
    adaptive_search,
    check_search_args,
    head_mlps,
)
from ..utils.tensors import split_batch
from .masks import check_maskable, module_names

# NNI wraps only the module types it has a pruning setting for; the packed gate linear of a
# gated MLP is an nn.Linear with the same parameters.
PruningSetting.register(PackedGateLinear.__name__, PruningSetting.registry["Linear"])


# ---- config_list: which MLPs ----------------------------------------------------------------
_SELECT_KEYS = ("op_names", "op_types", "op_names_re")
_EXCLUDE_KEYS = ("exclude_op_names", "exclude_op_types", "exclude_op_names_re")
_SPARSITY_KEYS = ("sparse_ratio", "sparsity", "sparsity_per_layer", "total_sparsity",
                  "sparse_threshold", "max_sparse_ratio", "min_sparse_ratio")


def _model_mlps(model: nn.Module) -> dict[str, MLPView]:
    """{model-relative name: view} of the MLPs of the model's vision tower."""
    tower, _ = vision_tower(model)
    names = module_names(model)
    return {names[id(v.module)]: v for v in find_mlps(tower).values()}


def select_mlps(model: nn.Module, config_list: Sequence[Mapping[str, Any]]) -> list[str]:
    """Names of the MLPs `config_list` selects, in forward order, with NNI's selection keys.

    Each entry selects modules the way NNI does (`op_names`, `op_types`, `op_names_re`, minus
    its own `exclude_op_*`); it selects an MLP when one of those modules is the MLP or a layer
    inside it. An entry with `exclude: True` (NNI's older form) removes what it selects from
    every entry. AMP chooses the sizes itself, so sparsity keys are refused.
    """
    if not isinstance(config_list, Sequence) or isinstance(config_list, (str, bytes)):
        raise ValueError(f"config_list must be a list of dicts, got {type(config_list).__name__}")
    if not config_list:
        raise ValueError("config_list is empty: it must select at least one MLP")
    mlps = _model_mlps(model)
    all_names = {n for n, _ in model.named_modules()}
    selected: set[str] = set()
    excluded: set[str] = set()
    for i, config in enumerate(config_list):
        where = f"config_list[{i}]"
        if not isinstance(config, Mapping):
            raise ValueError(f"{where} must be a dict, got {type(config).__name__}")
        for key, value in config.items():
            if key in _SPARSITY_KEYS:
                raise ValueError(f"{where}.{key}: AMP chooses each MLP's size by the entropy "
                                 "search (threshold), so sparsity keys are not used")
            if key == "exclude":
                if not isinstance(value, bool):
                    raise ValueError(f"{where}.exclude must be true or false, got {value!r}")
            elif key not in _SELECT_KEYS + _EXCLUDE_KEYS:
                raise ValueError(f"{where}.{key}: unknown key; expected "
                                 f"{', '.join(_SELECT_KEYS + _EXCLUDE_KEYS)} or exclude")
            elif not (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)):
                raise ValueError(f"{where}.{key} must be a list of strings, got {value!r}")
        if not any(k in config for k in _SELECT_KEYS):
            raise ValueError(f"{where} needs one of {', '.join(_SELECT_KEYS)}")
        unknown = [n for n in config.get("op_names", ()) if n not in all_names]
        if unknown:
            raise ValueError(f"{where}.op_names: no module named {unknown[0]!r} in "
                             f"{type(model).__name__}")
        chosen, _, _ = select_modules_by_config(
            model, {k: v for k, v in config.items() if k != "exclude"})
        hit = {m for m in mlps if any(n == m or n.startswith(m + ".") for n in chosen)}
        if not config.get("exclude"):
            stray = [n for n in config.get("op_names", ())
                     if not any(n == m or n.startswith(m + ".") for m in mlps)]
            if stray:
                raise ValueError(f"{where}.op_names: {stray[0]!r} is not an MLP nor a layer "
                                 f"inside one; MLPs: {', '.join(list(mlps)[:4])}...")
            if not hit:
                raise ValueError(f"{where} selects no MLP (an entry selects an MLP by its own "
                                 f"name or type, or a layer inside it); MLPs: "
                                 f"{', '.join(list(mlps)[:4])}...")
            selected |= hit
        else:
            excluded |= hit
    names = [m for m in mlps if m in selected and m not in excluded]
    if not names:
        raise ValueError("config_list excludes every MLP it selects")
    return names


# ---- the NNI pruner -----------------------------------------------------------------------
class AMPNNIPruner(Pruner):
    """Adaptive MLP Pruning as an NNI pruner.

    `config_list` selects MLPs with NNI's keys (see `select_mlps`); the selected MLPs are
    searched from the last to the first, each size found by binary search on the validation
    entropy (docs/algorithm.md section 3), candidates evaluated through NNI's own masks on the
    MLPs' input linears. Scores come from `importance` (an `AMPImportance` with scores) or are
    computed on `calib_batches`. `compress()` returns `(model, masks)`; the model keeps its
    shape (NNI masks it); `apply_nni_masks` makes it smaller. With `target` (e.g.
    {"mlp_params": 0.6}) the threshold is searched instead (budget mode, `search.budget`),
    starting at `threshold`.
    """

    def __init__(
        self,
        model: nn.Module,
        config_list: list[dict],
        *,
        val_batches: Sequence,
        threshold: float,
        calib_batches: Sequence | None = None,
        importance: AMPImportance | None = None,
        inv_temperature: float = 20.0,
        criterion: str = "entropy",
        max_steps: int = 6,
        round_to: int | None = None,
        cache_device_bytes: int = 2 << 30,
        cache_host_bytes: int = 8 << 30,
        cache_dir: str | None = None,
        show_progress: bool = True,
        search_head: bool = False,
        evaluator: Evaluator | None = None,
        existed_wrappers: dict[str, ModuleWrapper] | None = None,
        target: Target | Mapping | None = None,
    ):
        check_search_args(threshold, max_steps, round_to)
        self.target = Target.parse(target) if target is not None else None
        self.val_batches = list(val_batches)
        if not self.val_batches:
            raise ValueError("val_batches is empty")
        if importance is None:
            if not calib_batches:
                raise ValueError("give calib_batches (images to score on) or an importance "
                                 "with scores")
            importance = AMPImportance(inv_temperature, criterion, show_progress=show_progress)
        self.importance = importance
        self.calib_batches = calib_batches
        self.threshold, self.max_steps, self.round_to = threshold, max_steps, round_to
        self.cache_limits = (cache_device_bytes, cache_host_bytes, cache_dir)
        self.show_progress = show_progress

        tower, _ = vision_tower(model)  # refuses a model AMP cannot prune before any work
        mark_packed_gates(model)  # before NNI reads the module types it wraps
        mlps = _model_mlps(model)
        tower_names = module_names(tower)
        head = {n for n, v in mlps.items() if tower_names[id(v.module)] in head_mlps(model)}
        selected = select_mlps(model, config_list)
        # a pooling head's MLP is searched only when asked for (as in AMPPruner)
        self.mlp_names = [n for n in selected if search_head or n not in head]
        if not self.mlp_names:
            raise ValueError("config_list selects only the pooling head's MLP; pass "
                             "search_head=True to search it")
        self.kept_whole = {n: HEAD_KEPT if n in head and n in selected else NOT_SELECTED
                           for n in mlps if n not in self.mlp_names}
        for name in self.mlp_names:
            check_maskable(name, mlps[name])
        self.views = {n: mlps[n] for n in self.mlp_names}
        self.score_names = {n: tower_names[id(v.module)] for n, v in self.views.items()}
        names = module_names(model)
        self.input_names = {n: [names[id(lin)] for lin in v.inputs] for n, v in self.views.items()}
        self.amp_config_list = config_list  # NNI's self.config_list holds the wrapped linears
        self.search: PruneResult | None = None
        # parameter counts before NNI wraps the linears (wrapping hides their parameters)
        self._counts = {n: v.param_counts() for n, v in self.views.items()}
        self._mlp_params = sum(v.num_params() for v in find_mlps(tower).values())
        self._size_model = None
        if self.target is not None:
            images, _ = split_batch(self.val_batches[0])
            with torch.no_grad():
                self._size_model = SizeModel(tower, self.views, images[:1])
        wrapped = [lin for n in self.mlp_names for lin in self.input_names[n]]
        super().__init__(model, [{"op_names": wrapped}], evaluator, existed_wrappers)

    # ---- masks ----------------------------------------------------------------------------
    def keep_neurons(self, name: str, keep: torch.Tensor | None) -> None:
        """Mask MLP `name` so that only hidden neurons `keep` stay (None: all)."""
        view = self.views[name]
        alive = torch.ones(view.hidden, dtype=torch.bool)
        if keep is not None:
            alive.zero_()
            alive[keep.cpu()] = True
        rows = torch.cat([alive, alive]) if view.packed else alive
        update = {}
        for lin_name, lin in zip(self.input_names[name], view.inputs, strict=True):
            w = rows.to(lin.weight.device, lin.weight.dtype)
            update[lin_name] = {"weight": w[:, None].expand_as(lin.weight).contiguous()}
            if lin.bias is not None:
                update[lin_name]["bias"] = w.clone()
        self.update_masks(update)

    # ---- NNI protocol ---------------------------------------------------------------------
    def _single_compress(self, max_steps: int | None, max_epochs: int | None) -> None:
        if max_steps is not None or max_epochs is not None:
            raise ValueError("AMPNNIPruner does not train: call compress() without max_steps "
                             "or max_epochs, and fine-tune afterwards")
        self.search = self._search()

    def _fuse_preprocess(self, evaluator: Evaluator) -> None:
        raise NotImplementedError("AMPNNIPruner prunes a trained model without training; run "
                                  "it on its own (compress()) before or after other compressors")

    def _fuse_postprocess(self, evaluator: Evaluator) -> None:
        raise NotImplementedError("AMPNNIPruner cannot be fused with training")

    def compress(self, max_steps: int | None = None, max_epochs: int | None = None):
        """Search every selected MLP; returns (model, masks) like NNI's pruners."""
        return super().compress(max_steps, max_epochs)

    # ---- search ---------------------------------------------------------------------------
    def _scores(self) -> dict[str, torch.Tensor]:
        scores = self.importance.neuron_scores()
        if not scores:
            self.importance.accumulate(self.bound_model, self.calib_batches)
            scores = self.importance.neuron_scores()
        out = {}
        for name, view in self.views.items():
            s = scores.get(self.score_names[name])
            if s is None:
                raise ValueError(f"the importance has no scores for {self.score_names[name]}")
            if len(s) != view.hidden:
                raise ValueError(f"scores of {name} have {len(s)} entries, MLP has {view.hidden}")
            out[name] = s
        return out

    @contextmanager
    def _candidate(self, name: str, view: MLPView, keep: torch.Tensor):
        self.keep_neurons(name, keep)  # the next candidate or the commit overwrites it
        yield

    def _search(self) -> PruneResult:
        t0 = time.perf_counter()
        model = self.bound_model
        for name in self.mlp_names:  # a second compress() starts from the dense model again
            self.keep_neurons(name, None)
        scores = self._scores()
        all_mlps = list(_model_mlps(model))
        was_training = model.training
        model.eval()
        evaluate = EntropyEval(model, self.importance, self.val_batches, self.views,
                               StateCache(*self.cache_limits), self.show_progress)
        index_of = {n: all_mlps.index(n) for n in self.views}
        threshold, extra, budget = self.threshold, {}, None
        try:
            if self.target is None:
                out = adaptive_search(
                    self.views, scores, evaluate, candidate=self._candidate,
                    commit=lambda name, view, keep: self.keep_neurons(name, keep),
                    threshold=self.threshold, max_steps=self.max_steps, round_to=self.round_to,
                    index_of=index_of, show_progress=self.show_progress,
                    description="AMP search (NNI masks)")
            else:
                budget = budget_search(
                    self.views, scores, evaluate, self._candidate, self.target,
                    self._size_model, self.threshold, self.max_steps, self.round_to, index_of,
                    self.show_progress, reset=lambda: [self.keep_neurons(n, None)
                                                       for n in self.mlp_names])
                for name in self.mlp_names:
                    self.keep_neurons(name, budget.keep[name])
                out, threshold = budget.outcome, budget.threshold
                extra = {"budget": budget.to_dict()}
        finally:
            evaluate.close()
            model.train(was_training)
        sizes = {}
        for name, view in self.views.items():
            mask = self.get_masks()[self.input_names[name][0]]["weight"]
            sizes[name] = int(mask[:, 0].sum()) // (2 if view.packed else 1)
        before = self._mlp_params
        removed = sum(self._counts[n][1] * (v.hidden - sizes[n]) for n, v in self.views.items())
        return PruneResult(
            hidden_sizes=sizes,
            original_sizes={n: v.hidden for n, v in self.views.items()},
            trace=out.trace,
            params=None,  # the model keeps its shape under masks; see apply_nni_masks
            mlp_params=dict(before=before, after=before - removed),
            flops=None,
            entropy=out.entropy,
            threshold=threshold,
            max_steps=self.max_steps,
            round_to=self.round_to,
            evaluations=(out.evaluations if budget is None
                         else sum(it.evaluations for it in budget.iterations)),
            cache=evaluate.mode,
            seconds=time.perf_counter() - t0,
            kept_whole=dict(self.kept_whole),
            extra=extra,
        )
