"""Torch-Pruning integration: the packed-gate pruner, marking, and physical MLP pruning.

Torch-Pruning 1.6 traces `fc1 -> chunk -> act(x1) * x2` but maps a hidden neuron to
only one half of the packed linear, so the halves end with different sizes. Marking the
packed linear as `PackedGateLinear` (an explicit step, `mark_packed_gates`) and
registering `PackedGatePruner` for it makes the packed linear a leaf with H output
channels (one per hidden neuron) that removes rows j and j+H together.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
import torch_pruning as tp
from torch import nn

from .mlp import MLPView, find_mlps


class PackedGateLinear(nn.Linear):
    """nn.Linear whose 2*H outputs are two halves (gate, value) of H hidden neurons.

    Same forward as nn.Linear; the distinct type lets Torch-Pruning dispatch it to
    `PackedGatePruner`, which removes both halves of a neuron together.
    """


class PackedGatePruner(tp.pruner.function.LinearPruner):
    def _halves(self, layer: nn.Linear) -> int:
        return layer.out_features // 2

    def prune_out_channels(self, layer: nn.Linear, idxs: Sequence[int]) -> nn.Linear:
        h = self._halves(layer)
        # A group may reach this layer through either chunk of the split: fold both onto j.
        neurons = sorted({int(i) % h for i in idxs})
        rows = neurons + [j + h for j in neurons]
        return super().prune_out_channels(layer, rows)

    def get_out_channels(self, layer: nn.Linear) -> int:
        return self._halves(layer)


def customized_pruners() -> dict:
    """Pass as `customized_pruners=` to Torch-Pruning's DependencyGraph or pruners."""
    return {PackedGateLinear: PackedGatePruner()}


def mark_packed_gates(model: nn.Module) -> nn.Module:
    """Give the packed gate linears of `model`'s MLPs the `PackedGateLinear` type (same
    forward, same parameters) so that Torch-Pruning prunes both halves of a neuron
    together. Call it before building a DependencyGraph or a Torch-Pruning pruner; AMP's
    own entry points call it. Returns the model."""
    for view in find_mlps(model).values():
        if view.packed and type(view.inputs[0]) is nn.Linear:
            view.inputs[0].__class__ = PackedGateLinear
    return model


def build_dependency_graph(model: nn.Module, example_inputs) -> tp.DependencyGraph:
    mark_packed_gates(model)
    with torch.enable_grad(), warnings.catch_warnings():
        # Torch-Pruning warns that it would prune the last dim of unwrapped parameters
        # (cls token, layer scales) if the embedding dim were pruned; AMP never does.
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        return tp.DependencyGraph().build_dependency(
            model, example_inputs=example_inputs, customized_pruners=customized_pruners()
        )


@torch.no_grad()
def mlp_inputs(model: nn.Module, example_inputs, views: Mapping[str, MLPView]
               ) -> dict[str, torch.Tensor]:
    """The input each MLP of `views` gets when `model` runs `example_inputs` (first item)."""
    seen: dict[str, torch.Tensor] = {}
    handles = [v.module.register_forward_pre_hook(
        lambda _m, args, n=n: seen.setdefault(n, args[0][:1].detach())) for n, v in views.items()]
    try:
        model(*example_inputs) if isinstance(example_inputs, tuple) else model(example_inputs)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in views if n not in seen]
    if missing:
        raise RuntimeError(f"{missing[0]} did not run on the example inputs")
    return seen


def mlp_graph(view: MLPView, example: torch.Tensor) -> tp.DependencyGraph | None:
    """Torch-Pruning's dependency graph of one MLP module, traced alone on its own input
    `example`. A hidden neuron never leaves its MLP (input rows, hidden norm, output
    columns), so the group is the one a whole-model graph gives; tracing the MLP alone also
    avoids whole-model tracing failures that have nothing to do with MLPs (the RoPE concat
    of Sapiens2, a CLIP text tower). None for an MLP that prunes itself by slicing (its
    neurons are part of linears shared with attention, which the graph cannot split)."""
    if not view.graph_pruned:
        return None
    return build_dependency_graph(view.module, example)


def mlp_group(dg: tp.DependencyGraph, view: MLPView, remove: Sequence[int]):
    """The dependency-graph group that removes hidden neurons `remove` of one MLP."""
    return dg.get_pruning_group(view.output, tp.prune_linear_in_channels, idxs=list(remove))


def check_group(dg: tp.DependencyGraph, group) -> bool:
    """Torch-Pruning's `check_pruning_group` (no layer loses all its channels), counting a
    packed gate linear's neurons once: the group reaches it with both rows j and j+H of a
    neuron, which Torch-Pruning would count twice and so refuse to remove more than half."""
    for dep, idxs in group:
        layer = dep.target.module
        if isinstance(layer, PackedGateLinear) and dg.is_out_channel_pruning_fn(dep.handler):
            h = layer.out_features // 2
            if len({int(i) % h for i in idxs}) >= h:
                return False
            continue
        for is_fn, channels in ((dg.is_out_channel_pruning_fn, dg.get_out_channels),
                                (dg.is_in_channel_pruning_fn, dg.get_in_channels)):
            if is_fn(dep.handler):
                n = channels(layer)
                if n is not None and n <= len(idxs):
                    return False
    return True


def prune_mlp(dg: tp.DependencyGraph | None, view: MLPView, keep: torch.Tensor) -> None:
    """Keep only hidden neurons `keep` of `view`, through the dependency graph (`mlp_graph`;
    an MLP that is not graph-pruned slices itself)."""
    keep_set = set(int(i) for i in keep)
    remove = [j for j in range(view.hidden) if j not in keep_set]
    if not remove:
        return
    if not view.graph_pruned:
        view.prune(keep)
        return
    group = mlp_group(dg, view, remove)
    if not check_group(dg, group):
        raise RuntimeError(f"Torch-Pruning refuses to prune {view.name} to {len(keep_set)}")
    group.prune()


def prune_mlps(
    model: nn.Module, example_inputs, keep: Mapping[str, torch.Tensor]
) -> dict[str, int]:
    """Physically prune several MLPs of `model`: {mlp name: kept neuron indices}.
    `example_inputs` run `model` once to give each MLP's graph its real input."""
    views = find_mlps(model)
    for name in keep:
        if name not in views:
            raise KeyError(f"no MLP named {name!r}; found {list(views)[:4]}...")
    inputs = mlp_inputs(model, example_inputs, {n: views[n] for n in keep})
    for name, idxs in keep.items():
        prune_mlp(mlp_graph(views[name], inputs[name]), views[name], idxs)
    return {n: v.hidden for n, v in find_mlps(model).items()}
