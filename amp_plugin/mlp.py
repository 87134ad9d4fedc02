"""Views of transformer MLPs: which linears produce a hidden neuron and which consume it.

One matcher per MLP layout, registered in `MLP_KINDS`; `find_mlps` walks a model and
returns the views in forward order. The algorithm code only sees `MLPView`.

A hidden neuron j is column j of the output linear plus row j of every input linear;
for a packed gate (one linear of 2*H outputs, chunked) rows j and j+H.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


class PackedGateLinear(nn.Linear):
    """nn.Linear whose 2*H outputs are two halves (gate, value) of H hidden neurons.

    Same forward as nn.Linear; the distinct type lets Torch-Pruning dispatch it to
    `PackedGatePruner`, which removes both halves of a neuron together.
    """


@dataclass
class MLPView:
    name: str
    module: nn.Module
    inputs: list[nn.Linear]
    output: nn.Linear
    kind: str
    hidden_norm: nn.Module | None = None  # a norm over the hidden dim sits before `output`
    packed: bool = False
    _extra: dict = field(default_factory=dict, repr=False)

    @property
    def hidden(self) -> int:
        return self.output.in_features

    @property
    def exact_masking(self) -> bool:
        """Zeroing a_j at the input of `output` equals removing neuron j."""
        return self.hidden_norm is None

    def num_params(self) -> int:
        mods = [*self.inputs, self.output] + ([self.hidden_norm] if self.hidden_norm else [])
        return sum(p.numel() for m in mods for p in m.parameters(recurse=False))

    def input_rows(self, idxs: torch.Tensor) -> torch.Tensor:
        """Rows of the input linear(s) that belong to hidden neurons `idxs`."""
        if self.packed:
            return torch.cat([idxs, idxs + self.hidden])
        return idxs

    def sliced_copy(self, keep: torch.Tensor) -> nn.Module:
        """A copy of the MLP module keeping only hidden neurons `keep` (for exact trials
        where masking is not exact); the original module is left untouched."""
        new = copy.deepcopy(self.module)
        view = _match(self.name, new)
        keep = keep.to(view.output.weight.device)
        rows = view.input_rows(keep)
        for lin in view.inputs:
            _slice_linear(lin, rows, dim=0)
        _slice_linear(view.output, keep, dim=1)
        if view.hidden_norm is not None:
            for p_name in ("weight", "bias"):
                p = getattr(view.hidden_norm, p_name, None)
                if p is not None:
                    setattr(view.hidden_norm, p_name, nn.Parameter(p.data[keep].clone(),
                                                                  requires_grad=p.requires_grad))
            if hasattr(view.hidden_norm, "normalized_shape"):
                view.hidden_norm.normalized_shape = (len(keep),)
        return new


def _slice_linear(lin: nn.Linear, idxs: torch.Tensor, dim: int) -> None:
    lin.weight = nn.Parameter(lin.weight.data.index_select(dim, idxs).clone(),
                              requires_grad=lin.weight.requires_grad)
    if dim == 0:
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias.data[idxs].clone(),
                                    requires_grad=lin.bias.requires_grad)
        lin.out_features = len(idxs)
    else:
        lin.in_features = len(idxs)


def _norm_or_none(m: nn.Module | None) -> nn.Module | None:
    return None if m is None or isinstance(m, nn.Identity) else m


# ---- matchers: one per layout ------------------------------------------------------------
Matcher = Callable[[str, nn.Module], "MLPView | None"]
MLP_KINDS: OrderedDict[str, Matcher] = OrderedDict()


def register_mlp_kind(kind: str):
    def deco(fn: Matcher) -> Matcher:
        MLP_KINDS[kind] = fn
        return fn
    return deco


@register_mlp_kind("timm_mlp")
def _timm_mlp(name: str, m: nn.Module) -> MLPView | None:
    from timm.layers import Mlp

    if isinstance(m, Mlp) and isinstance(m.fc1, nn.Linear) and isinstance(m.fc2, nn.Linear):
        return MLPView(name, m, [m.fc1], m.fc2, "timm_mlp", _norm_or_none(m.norm))
    return None


@register_mlp_kind("timm_glu_packed")
def _timm_glu(name: str, m: nn.Module) -> MLPView | None:
    from timm.layers import GluMlp

    if isinstance(m, GluMlp) and isinstance(m.fc1, nn.Linear):
        if type(m.fc1) is nn.Linear:  # mark it so Torch-Pruning uses the packed pruner
            m.fc1.__class__ = PackedGateLinear
        return MLPView(name, m, [m.fc1], m.fc2, "timm_glu_packed", _norm_or_none(m.norm),
                       packed=True)
    return None


@register_mlp_kind("timm_swiglu")
def _timm_swiglu(name: str, m: nn.Module) -> MLPView | None:
    from timm.layers import SwiGLU

    if isinstance(m, SwiGLU):
        return MLPView(name, m, [m.fc1_g, m.fc1_x], m.fc2, "timm_swiglu", _norm_or_none(m.norm))
    return None


@register_mlp_kind("open_clip_mlp")
def _open_clip_mlp(name: str, m: nn.Module) -> MLPView | None:
    if isinstance(m, nn.Sequential) and hasattr(m, "c_fc") and hasattr(m, "c_proj"):
        return MLPView(name, m, [m.c_fc], m.c_proj, "open_clip_mlp",
                       _norm_or_none(getattr(m, "ln", None)))
    return None


def _match(name: str, module: nn.Module) -> MLPView | None:
    for matcher in MLP_KINDS.values():
        view = matcher(name, module)
        if view is not None:
            return view
    return None


def find_mlps(model: nn.Module) -> OrderedDict[str, MLPView]:
    """Ordered {qualified name: MLPView} of every MLP in `model`, in module order."""
    found: OrderedDict[str, MLPView] = OrderedDict()
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in found):
            continue
        view = _match(name, module)
        if view is not None:
            found[name] = view
    return found
