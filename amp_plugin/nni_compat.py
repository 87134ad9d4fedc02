"""AMP inside NNI 3.0 (`nni.compression`), and NNI masks to a physically smaller model.

- `AMPNNIPruner`: an NNI `Pruner` whose masks are AMP's adaptive MLP sizes (ALGORITHM.md 3).
  It is built NNI-style from `(model, config_list, ...)` and `compress()` returns
  `(model, masks)` in NNI's format, so NNI scripts use it like `L1NormPruner`.
- `apply_nni_masks`: removes the MLP hidden neurons that NNI masks switch off (masks of any
  NNI pruner) through the Torch-Pruning dependency graph. NNI's own `ModelSpeedup` cannot do
  it on current PyTorch: its concrete tracer stops on timm ViTs with torch 2.x
  (`AttributeError: 'NoneType' object has no attribute 'startswith'`).
- `entropy_evaluator`: a `TorchEvaluator` whose training step is AMP's label-free entropy,
  so that NNI's own `TaylorPruner` scores neurons with AMP's criterion.

A hidden neuron is switched off by NNI masks on the MLP's input linear(s) (whole rows of the
weight, with the matching bias entries) or on its output linear (a whole weight column).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import nni
import torch
from nni.compression import TorchEvaluator
from nni.compression.base.compressor import Pruner
from nni.compression.base.config import select_modules_by_config
from nni.compression.base.setting import PruningSetting
from nni.compression.base.wrapper import ModuleWrapper
from nni.compression.utils import Evaluator
from torch import nn

from .adapters import vision_tower
from .cache import StateCache
from .criterion import make_criterion
from .graph import build_dependency_graph, mlp_group, prune_mlp
from .importance import AMPImportance, split_batch
from .mlp import MLPView, PackedGateLinear, find_mlps
from .progress import progress
from .search import Trial, _block_index, candidate_sizes, keep_order

# NNI wraps only the module types it has a pruning setting for; the packed gate linear of a
# gated MLP is an nn.Linear with the same parameters.
PruningSetting.register(PackedGateLinear.__name__, PruningSetting.registry["Linear"])


class MaskError(ValueError):
    """NNI masks that cannot be turned into removed hidden neurons; names module and reason."""


# ---- config_list: which MLPs ----------------------------------------------------------------
_SELECT_KEYS = ("op_names", "op_types", "op_names_re")
_EXCLUDE_KEYS = ("exclude_op_names", "exclude_op_types", "exclude_op_names_re")
_SPARSITY_KEYS = ("sparse_ratio", "sparsity", "sparsity_per_layer", "total_sparsity",
                  "sparse_threshold", "max_sparse_ratio", "min_sparse_ratio")


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


def _model_mlps(model: nn.Module) -> dict[str, MLPView]:
    """{model-relative name: view} of the MLPs of the model's vision tower."""
    tower, _ = vision_tower(model)
    names = _module_names(model)
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


# ---- exactness of masks ----------------------------------------------------------------------
def _local_names(view: MLPView) -> dict[int, str]:
    return {id(m): n for n, m in view.module.named_modules()}


@torch.no_grad()
def _hidden_activation(view: MLPView, masks: Mapping[nn.Linear, tuple]) -> torch.Tensor:
    """|a| per hidden neuron (max over a random probe) with the input linears' parameters
    multiplied by `masks` ({linear: (weight mask, bias mask or None)})."""
    local = _local_names(view)
    params = {}
    for lin, (w_mask, b_mask) in masks.items():
        params[f"{local[id(lin)]}.weight"] = lin.weight * w_mask.to(lin.weight)
        if lin.bias is not None and b_mask is not None:
            params[f"{local[id(lin)]}.bias"] = lin.bias * b_mask.to(lin.bias)
    first = view.inputs[0].weight
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, view.inputs[0].in_features, generator=gen).to(first)
    seen = {}

    def grab(_module, args):
        seen["a"] = args[0]

    handle = view.output.register_forward_pre_hook(grab)
    was_training = view.module.training
    view.module.eval()  # dropout would zero live neurons at random
    try:
        torch.func.functional_call(view.module, params, (x,))
    finally:
        handle.remove()
        view.module.train(was_training)
    return seen["a"].abs().float().flatten(0, -2).amax(dim=0)


def check_maskable(name: str, view: MLPView) -> None:
    """Raise MaskError unless zeroing the input rows of a neuron removes it exactly."""
    if view.hidden_norm is not None:
        raise MaskError(f"{name}: a norm over the hidden dim sits between its input and "
                        "output linears, so zeroed neurons still change the others; use "
                        "amp_plugin.AMPPruner for it")
    off = {lin: (torch.zeros_like(lin.weight), None if lin.bias is None
                 else torch.zeros_like(lin.bias)) for lin in view.inputs}
    if bool((_hidden_activation(view, off) != 0).any()):
        raise MaskError(f"{name}: with its input rows masked the hidden activation is not zero "
                        "(activation(0) != 0), so NNI masks cannot stand for removed neurons")


# ---- the NNI pruner ---------------------------------------------------------------------------
@dataclass
class MaskSearch:
    """What `AMPNNIPruner.compress()` decided (the masks hold the same information)."""

    hidden_sizes: dict[str, int]
    original_sizes: dict[str, int]
    trace: list[Trial]
    entropy: dict[str, float]
    threshold: float
    max_steps: int
    evaluations: int
    cache: str
    seconds: float
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class AMPNNIPruner(Pruner):
    """Adaptive MLP Pruning as an NNI pruner.

    `config_list` selects MLPs with NNI's keys (see `select_mlps`); the selected MLPs are
    searched from the last to the first, each size found by binary search on the validation
    entropy (ALGORITHM.md 3), candidates evaluated through NNI's own masks on the MLPs' input
    linears. Scores come from `importance` (an `AMPImportance` with scores) or are computed on
    `calib_batches`. `compress()` returns `(model, masks)`; the model keeps its shape (NNI
    masks it); `apply_nni_masks` makes it smaller.
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
        evaluator: Evaluator | None = None,
        existed_wrappers: dict[str, ModuleWrapper] | None = None,
    ):
        if threshold is None or threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        if round_to is not None and round_to < 1:
            raise ValueError(f"round_to must be a positive integer, got {round_to}")
        self.val_batches = [split_batch(b) for b in val_batches]
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

        mlps = _model_mlps(model)  # also marks packed gates before NNI reads module types
        self.mlp_names = select_mlps(model, config_list)
        for name in self.mlp_names:
            check_maskable(name, mlps[name])
        self.views = {n: mlps[n] for n in self.mlp_names}
        tower, _ = vision_tower(model)
        tower_names = _module_names(tower)
        self.score_names = {n: tower_names[id(v.module)] for n, v in self.views.items()}
        names = _module_names(model)
        self.input_names = {n: [names[id(lin)] for lin in v.inputs] for n, v in self.views.items()}
        self.amp_config_list = config_list  # NNI's self.config_list holds the wrapped linears
        self.search: MaskSearch | None = None
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

    def _search(self) -> MaskSearch:
        t0 = time.perf_counter()
        model = self.bound_model
        for name in self.mlp_names:  # a second compress() starts from the dense model again
            self.keep_neurons(name, None)
        scores = self._scores()
        tower, adapter = vision_tower(model)
        device = next(model.parameters()).device
        criterion = self.importance.criterion
        was_training = model.training
        model.eval()
        block_of = None
        if self.importance.feature_fn is None:
            block_of = _block_index(adapter.blocks(tower), self.views)
        cache, mode = None, "none (full forward per trial)"
        if block_of is not None:
            cache = StateCache(*self.cache_limits)
            mode = cache.fill(tower, adapter, [im for im, _ in self.val_batches],
                              starts=sorted(set(block_of.values())),
                              show_progress=self.show_progress)

        @torch.no_grad()
        def entropy(name: str) -> float:
            total = 0.0
            for b, (images, extra) in enumerate(self.val_batches):
                extra = extra.to(device) if isinstance(extra, torch.Tensor) else extra
                if cache is None:
                    feats = self.importance.features(model, images.to(device))
                else:
                    state = cache.get(block_of[name], b)
                    for i in range(block_of[name], len(adapter.blocks(tower))):
                        state = adapter.run_block(tower, i, state)
                    feats = adapter.head(tower, state)
                total += float(criterion(feats, extra))
            return total / len(self.val_batches)

        order_of_all = list(_model_mlps(model))
        trace: list[Trial] = []
        evaluations, e_prev, e_start = 0, None, None
        names = self.mlp_names[::-1]
        try:
            for idx in progress(range(len(names)), "AMP search (NNI masks)", self.show_progress):
                name, view = names[idx], self.views[names[idx]]
                if e_prev is None:
                    e_prev = entropy(name)
                    evaluations += 1
                    e_start = e_prev if e_start is None else e_start
                order = keep_order(scores[name])
                measured: dict[int, float] = {}
                reference = e_prev

                def accept(size: int, name=name, order=order, measured=measured,
                           reference=reference) -> bool:
                    nonlocal evaluations
                    if size not in measured:
                        self.keep_neurons(name, order[:size])
                        measured[size] = entropy(name)
                        evaluations += 1
                    ok = measured[size] - reference <= self.threshold
                    trace.append(Trial(name, order_of_all.index(name), size, measured[size], ok,
                                       reference))
                    return ok

                best = candidate_sizes(view.hidden, self.max_steps, accept, self.round_to)
                self.keep_neurons(name, order[:best] if best < view.hidden else None)
                hits = [t for t in trace if t.block == name and t.accepted and t.size == best]
                e_prev = hits[-1].entropy if hits else None
                if cache is not None:
                    cache.drop(block_of[name])
            e_end = e_prev if e_prev is not None else entropy(names[-1])
        finally:
            if cache is not None:
                cache.close()
            model.train(was_training)
        sizes = {}
        for name, view in self.views.items():
            mask = self.get_masks()[self.input_names[name][0]]["weight"]
            sizes[name] = int(mask[:, 0].sum()) // (2 if view.packed else 1)
        return MaskSearch(
            hidden_sizes=sizes,
            original_sizes={n: v.hidden for n, v in self.views.items()},
            trace=trace,
            entropy=dict(before=float(e_start), after=float(e_end)),
            threshold=self.threshold,
            max_steps=self.max_steps,
            evaluations=evaluations,
            cache=mode,
            seconds=time.perf_counter() - t0,
        )


# ---- masks to a smaller model -----------------------------------------------------------------
def _as_mask(where: str, mask: Any, param: torch.Tensor | None) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise MaskError(f"{where}: a mask must be a tensor, got {type(mask).__name__}")
    if param is None:
        raise MaskError(f"{where}: the module has no such parameter to mask")
    try:
        full = mask.detach().to("cpu", torch.float32).expand(param.shape)
    except RuntimeError:
        raise MaskError(f"{where}: mask shape {tuple(mask.shape)} does not fit the parameter "
                        f"shape {tuple(param.shape)}") from None
    if not bool(((full == 0) | (full == 1)).all()):
        raise MaskError(f"{where}: mask values must be 0 or 1")
    return full


def _whole(where: str, mask: torch.Tensor, dim: int, unit: str) -> torch.Tensor:
    """Which slices along `dim` the mask zeroes; raises if a slice is only partly masked."""
    other = 1 - dim
    off, on = (mask == 0).all(dim=other), (mask == 1).all(dim=other)
    partial = (~(off | on)).nonzero().flatten()
    if len(partial):
        j = int(partial[0])
        k = int((mask.select(dim, j) == 0).sum())
        raise MaskError(f"{where}: {unit} {j} is partly masked ({k} of {mask.shape[other]} "
                        f"entries); only whole hidden neurons can be removed")
    return off


def plan_from_masks(model: nn.Module,
                    masks: Mapping[str, Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """{MLP name: kept neuron indices} for the MLPs whose neurons `masks` switch off.

    Raises MaskError, naming the module and the reason, for any mask that is not whole
    hidden neurons or whose removal would not give the masked model's output.
    """
    if not isinstance(masks, Mapping):
        raise MaskError(f"masks must be a dict {{module name: {{target: mask}}}}, "
                        f"got {type(masks).__name__}")
    modules = dict(model.named_modules())
    still = [n for n, m in modules.items() if hasattr(m, "_nni_wrapper")]
    if still:
        raise MaskError(f"the model is still wrapped by an NNI compressor ({still[0]}): call "
                        "pruner.unwrap_model() first")
    mlps = find_mlps(model)  # any model: the masks may come from any NNI pruner
    names = _module_names(model)
    role: dict[str, tuple[str, str]] = {}
    for mname, view in mlps.items():
        for lin in view.inputs:
            role[names[id(lin)]] = (mname, "input")
        role[names[id(view.output)]] = (mname, "output")

    # per MLP: {input linear: [weight mask, bias mask]}, removed-by-column flags
    inputs: dict[str, dict[nn.Linear, list]] = {}
    by_column: dict[str, torch.Tensor] = {}
    for module_name, targets in masks.items():
        if module_name not in modules:
            raise MaskError(f"masks name module {module_name!r}, which the model does not have")
        if not isinstance(targets, Mapping):
            raise MaskError(f"{module_name}: expected {{'weight': mask, 'bias': mask}}, got "
                            f"{type(targets).__name__}")
        module = modules[module_name]
        for target, mask in targets.items():
            where = f"{module_name}.{target}"
            if mask is None:
                continue
            if target not in ("weight", "bias"):
                raise MaskError(f"{where}: only 'weight' and 'bias' masks can be applied")
            full = _as_mask(where, mask, getattr(module, target, None))
            if bool(full.all()):
                continue
            if module_name not in role:
                raise MaskError(f"{where}: {type(module).__name__} {module_name!r} is not a "
                                "linear of an MLP hidden layer; only MLP hidden neurons are "
                                "removed")
            mname, kind = role[module_name]
            view = mlps[mname]
            if kind == "output":
                if target == "bias":
                    raise MaskError(f"{where}: masks output channels (the embedding dim), not "
                                    "hidden neurons")
                if bool(((full == 0).all(dim=1) | (full == 1).all(dim=1)).all()):
                    raise MaskError(f"{where}: masks whole output rows (channels of the "
                                    "embedding dim), not hidden neurons (whole columns)")
                off = _whole(where, full, dim=1, unit="column")
                by_column[mname] = by_column.get(mname, torch.zeros(view.hidden, dtype=torch.bool))
                by_column[mname] |= off
            else:
                slot = inputs.setdefault(mname, {}).setdefault(module, [None, None])
                slot[0 if target == "weight" else 1] = full

    plan = {}
    for mname in [m for m in mlps if m in inputs or m in by_column]:
        view = mlps[mname]
        h = view.hidden
        off = by_column.get(mname, torch.zeros(h, dtype=torch.bool)).clone()
        via_rows = torch.zeros(h, dtype=torch.bool)
        probe = {}
        for lin, (w, b) in inputs.get(mname, {}).items():
            lin_name = names[id(lin)]
            w = torch.ones(lin.weight.shape) if w is None else w
            rows_off = _whole(f"{lin_name}.weight", w, dim=0, unit="row")
            if b is not None:
                kept_bias_off = (b == 0) & ~rows_off
                if bool(kept_bias_off.any()):
                    r = int(kept_bias_off.nonzero()[0])
                    raise MaskError(f"{lin_name}.bias: entry {r} is masked but weight row {r} "
                                    "is kept; that is not a removed neuron")
            neurons = rows_off.view(2, h).any(dim=0) if view.packed else rows_off
            via_rows |= neurons
            probe[lin] = (w, b)
        if bool(via_rows.any()):
            live = _hidden_activation(view, probe) != 0
            bad = (via_rows & ~off & live).nonzero().flatten()
            if len(bad):
                j = int(bad[0])
                raise MaskError(f"{mname}: masks switch off rows of hidden neuron {j} but its "
                                "activation stays non-zero (bias kept, a gate half masked with "
                                "activation(0) != 0, ...), so removing it would change the "
                                "output")
        off |= via_rows
        if not bool(off.any()):
            continue
        if view.hidden_norm is not None:
            raise MaskError(f"{mname}: a norm over the hidden dim sits before the output "
                            "linear, so removing neurons does not give the masked output")
        if bool(off.all()):
            raise MaskError(f"{mname}: masks switch off all {h} hidden neurons; an MLP keeps "
                            "at least one")
        plan[mname] = (~off).nonzero().flatten()
    return plan


def apply_nni_masks(model: nn.Module, masks: Mapping[str, Mapping[str, Any]],
                    example_inputs: torch.Tensor | tuple) -> dict[str, int]:
    """Physically remove the MLP hidden neurons that NNI `masks` switch off.

    `masks` is NNI's `{module name: {"weight": mask, "bias": mask}}` (from `compress()` or
    `get_masks()` of any NNI pruner) for the unwrapped `model`. Every mask is checked before
    anything changes: on a mask that is not whole hidden neurons a MaskError names the module
    and the reason, and the model is left as it was. `example_inputs` run `model` once
    (Torch-Pruning traces it). Returns {MLP name: hidden size} of every MLP of the model.
    """
    plan = plan_from_masks(model, masks)
    if plan:
        dg = build_dependency_graph(model, example_inputs)
        views = find_mlps(model)
        for name, keep in plan.items():
            kept = set(keep.tolist())
            group = mlp_group(dg, views[name], [j for j in range(views[name].hidden)
                                                 if j not in kept])
            if not dg.check_pruning_group(group):
                raise MaskError(f"{name}: Torch-Pruning refuses to remove these neurons")
        for name, keep in plan.items():
            prune_mlp(dg, views[name], keep)
    return {n: v.hidden for n, v in find_mlps(model).items()}


# ---- NNI's TaylorPruner on the entropy --------------------------------------------------------
FeatureFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _tower_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    tower, adapter = vision_tower(model)
    return adapter.features(tower, images)


def entropy_evaluator(
    model: nn.Module,
    calib_batches: Sequence,
    inv_temperature: float = 20.0,
    criterion: str = "entropy",
    feature_fn: FeatureFn | None = None,
    show_progress: bool = True,
) -> TorchEvaluator:
    """A TorchEvaluator whose training step is AMP's label-free criterion.

    Give it to NNI's `TaylorPruner(model, config_list, evaluator, training_steps=N)`: each
    step runs one calibration batch forward and backward, so Taylor scores rank neurons by
    the entropy instead of a labelled loss. The optimizer is SGD with lr 0: the steps only
    collect gradients and leave the weights as they are. Runs in eval mode (no dropout or
    drop-path), like AMP's own scoring. Build it before the pruner (NNI needs the optimizer
    on the unwrapped model).
    """
    batches = [split_batch(b) for b in calib_batches]
    if not batches:
        raise ValueError("calib_batches is empty")
    loss_fn = make_criterion(criterion, inv_temperature)
    features = feature_fn or _tower_features

    def training_step(batch, model: nn.Module) -> torch.Tensor:
        images, extra = batch
        return loss_fn(features(model, images), extra)

    def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None,
                      max_epochs=None):
        device = next(model.parameters()).device
        steps = max_steps if max_steps else len(batches) * (max_epochs or 1)
        was_training = model.training
        model.eval()
        try:
            for step in progress(range(steps), "entropy Taylor steps", show_progress):
                images, extra = batches[step % len(batches)]
                extra = extra.to(device) if isinstance(extra, torch.Tensor) else extra
                optimizers.zero_grad(set_to_none=True)
                training_step((images.to(device), extra), model).backward()
                optimizers.step()
        finally:
            model.train(was_training)

    optimizer = nni.trace(torch.optim.SGD)(model.parameters(), lr=0.0)
    return TorchEvaluator(training_func, optimizer, training_step)
