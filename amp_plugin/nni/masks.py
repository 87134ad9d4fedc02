"""NNI masks to a physically smaller model: `apply_nni_masks` removes the MLP hidden
neurons that masks of any NNI pruner switch off, through the Torch-Pruning dependency
graph. NNI's own `ModelSpeedup` cannot do it on current PyTorch: its concrete tracer
stops on timm ViTs with torch 2.x (`AttributeError: 'NoneType' object has no attribute
'startswith'`).

A hidden neuron is switched off by NNI masks on the MLP's input linear(s) (whole rows of the
weight, with the matching bias entries) or on its output linear (a whole weight column).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..core.mlp import MLPView, find_mlps
from ..core.tp import check_group, mlp_graph, mlp_group, mlp_inputs, prune_mlp


class MaskError(ValueError):
    """NNI masks that cannot be turned into removed hidden neurons; names module and reason."""


def module_names(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


# ---- exactness of masks ------------------------------------------------------------------
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

    handle = view.tap.register_forward_pre_hook(grab)
    was_training = view.module.training
    view.module.eval()  # dropout would zero live neurons at random
    try:
        torch.func.functional_call(view.module, params, (x,))
    finally:
        handle.remove()
        view.module.train(was_training)
    return seen["a"].abs().float().flatten(0, -2).amax(dim=0)


def _shared_linears(name: str, view: MLPView) -> MaskError:
    return MaskError(f"{name}: {view.fused_reason()}, so an NNI mask, which covers a whole "
                     "linear, cannot stand for its hidden neurons alone; use "
                     "amp_plugin.AMPPruner for it")


def check_maskable(name: str, view: MLPView) -> None:
    """Raise MaskError unless zeroing the input rows of a neuron removes it exactly."""
    if not view.graph_pruned:
        raise _shared_linears(name, view)
    if view.hidden_norm is not None:
        norm = next(n for n, m in view.module.named_modules() if m is view.hidden_norm)
        raise MaskError(f"{name}: its norm over the hidden dim ({name}.{norm}, "
                        f"{type(view.hidden_norm).__name__}) sits between its input and "
                        "output linears, so zeroed neurons still change the others; use "
                        "amp_plugin.AMPPruner for it")
    off = {lin: (torch.zeros_like(lin.weight), None if lin.bias is None
                 else torch.zeros_like(lin.bias)) for lin in view.inputs}
    if bool((_hidden_activation(view, off) != 0).any()):
        raise MaskError(f"{name}: with its input rows masked the hidden activation is not zero "
                        "(activation(0) != 0), so NNI masks cannot stand for removed neurons")


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
    names = module_names(model)
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
            if not view.graph_pruned:
                raise _shared_linears(mname, view)
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
        if view.hidden_norm is not None:
            raise MaskError(f"{mname}: its norm over the hidden dim "
                            f"({names[id(view.hidden_norm)]}, "
                            f"{type(view.hidden_norm).__name__}) sits between the input and "
                            "output linears, so masked neurons still change the others and "
                            "removing them does not give the masked output")
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
        views = find_mlps(model)
        inputs = mlp_inputs(model, example_inputs, {n: views[n] for n in plan})
        graphs = {n: mlp_graph(views[n], inputs[n]) for n in plan}
        for name, keep in plan.items():
            kept = set(keep.tolist())
            group = mlp_group(graphs[name], views[name], [j for j in range(views[name].hidden)
                                                           if j not in kept])
            if not check_group(graphs[name], group):
                raise MaskError(f"{name}: Torch-Pruning refuses to remove these neurons")
        for name, keep in plan.items():
            prune_mlp(graphs[name], views[name], keep)
    return {n: v.hidden for n, v in find_mlps(model).items()}


