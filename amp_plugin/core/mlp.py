"""Views of transformer MLPs: which linears produce a hidden neuron and which consume it.

One matcher per MLP layout, registered with `register_mlp_kind` by the family modules;
`find_mlps` walks a model and returns the views in forward order without changing the
model. The algorithm code only sees `MLPView`.

A hidden neuron j is column j of the output linear plus row j of every input linear;
for a packed gate (one linear of 2*H outputs, chunked) rows j and j+H. A `FusedMLPView`
is an MLP whose neurons are a range of rows and columns of linears it shares with other
layers (a parallel block's attention): it is pruned by slicing, not through the graph.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..utils.registry import Registry


@dataclass
class MLPView:
    name: str
    module: nn.Module
    inputs: list[nn.Linear]
    output: nn.Linear
    kind: str
    hidden_norm: nn.Module | None = None  # a norm over the hidden dim sits before `output`
    packed: bool = False  # inputs[0] holds gate and value halves of 2*H rows
    hidden_tap: nn.Module | None = None  # its input is the hidden activation (else `output`)

    # Torch-Pruning's dependency graph removes a neuron (a FusedMLPView slices itself)
    graph_pruned = True

    @property
    def hidden(self) -> int:
        return self.output.in_features

    @property
    def tap(self) -> nn.Module:
        """The module whose first forward input is the hidden activation (..., H): scores are
        tapped and candidates masked by forward pre-hooks on it."""
        return self.hidden_tap if self.hidden_tap is not None else self.output

    def sync(self) -> None:
        """Make the module's own size attributes agree with its parameters' shapes (after a
        load resized them); nothing to do where the linears are the MLP's own."""

    @property
    def exact_masking(self) -> bool:
        """Zeroing a_j at the input of `output` equals removing neuron j."""
        return self.hidden_norm is None

    def _modules(self) -> list[nn.Module]:
        return [*self.inputs, self.output] + ([self.hidden_norm] if self.hidden_norm else [])

    def num_params(self) -> int:
        return sum(p.numel() for m in self._modules() for p in m.parameters(recurse=False))

    def param_counts(self) -> tuple[int, int]:
        """(parameters that do not depend on the hidden size, parameters per neuron)."""
        per_neuron, fixed = 0, 0
        for m in self._modules():
            for name, p in m.named_parameters(recurse=False):
                if m is self.output and name == "bias":
                    fixed += p.numel()
                else:
                    per_neuron += p.numel() // self.hidden
        return fixed, per_neuron

    def num_params_at(self, size: int) -> int:
        """Parameters of this MLP if it kept `size` hidden neurons."""
        fixed, per_neuron = self.param_counts()
        return fixed + per_neuron * size

    def input_rows(self, idxs: torch.Tensor) -> torch.Tensor:
        """Rows of the input linear(s) that belong to hidden neurons `idxs`."""
        if self.packed:
            return torch.cat([idxs, idxs + self.hidden])
        return idxs

    def sliced_copy(self, keep: torch.Tensor) -> nn.Module:
        """A copy of the MLP module keeping only hidden neurons `keep` (for exact trials
        where masking is not exact); the original module is left untouched."""
        new = copy.deepcopy(self.module)
        view = match_mlp(self.name, new)
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


def _with_range(total: int, offset: int, size: int, keep: torch.Tensor) -> torch.Tensor:
    """Indices 0..total-1 keeping only `keep` of the range [offset, offset + size)."""
    device = keep.device
    return torch.cat([torch.arange(offset, device=device), offset + keep,
                      torch.arange(offset + size, total, device=device)])


@dataclass
class FusedMLPView(MLPView):
    """An MLP whose hidden neuron j is row `input_offset + j` of each input linear (shared
    with other layers, e.g. q, k, v), column `output_offset + j` of the output linear (its
    last columns, the others may belong to attention), and entry j of the module's
    parameters named in `hidden_params`. Torch-Pruning's graph cannot remove part of a
    linear's row range, so `prune` slices the parameters directly and the family's
    `resize(module, size)` updates what the module's forward reads (e.g. split sizes).
    `shared` says, for error messages, what the linears are shared with."""

    input_offset: int = 0
    output_offset: int = 0
    hidden_params: tuple[str, ...] = ()
    resize: Callable[[nn.Module, int], None] | None = None
    shared: str = ""

    graph_pruned = False

    @property
    def hidden(self) -> int:
        return self.output.in_features - self.output_offset

    def fused_reason(self) -> str:
        """Why no group of Torch-Pruning's or NNI mask holds these neurons alone."""
        return (f"{type(self.module).__name__} fuses its MLP into linears shared with "
                f"attention ({self.shared})")

    def _vectors(self) -> list[nn.Parameter]:
        return [getattr(self.module, n) for n in self.hidden_params]

    def param_counts(self) -> tuple[int, int]:
        """(parameters that do not depend on the hidden size: the output bias when the output
        linear is the MLP's own, parameters per neuron: its rows, column and entries)."""
        per_neuron = sum(lin.in_features + (lin.bias is not None) for lin in self.inputs)
        per_neuron += self.output.out_features + len(self._vectors())
        own_output = self.output_offset == 0 and self.output.bias is not None
        return (self.output.out_features if own_output else 0), per_neuron

    def num_params(self) -> int:
        return self.num_params_at(self.hidden)

    def input_rows(self, idxs: torch.Tensor) -> torch.Tensor:
        return idxs + self.input_offset

    def prune(self, keep: torch.Tensor) -> None:
        """Keep only hidden neurons `keep` (in index order), slicing the parameters."""
        h = self.hidden
        keep = torch.unique(keep.to(self.output.weight.device))  # sorted, as the graph keeps
        if not len(keep) or int(keep[0]) < 0 or int(keep[-1]) >= h:
            raise ValueError(f"{self.name}: cannot keep neurons {keep.tolist()[:4]}... of {h}")
        for lin in self.inputs:
            _slice_linear(lin, _with_range(lin.out_features, self.input_offset, h, keep), dim=0)
        _slice_linear(self.output, _with_range(self.output.in_features, self.output_offset, h,
                                               keep), dim=1)
        for name, p in zip(self.hidden_params, self._vectors(), strict=True):
            setattr(self.module, name, nn.Parameter(p.data[keep].clone(),
                                                    requires_grad=p.requires_grad))
        self.sync()

    def sync(self) -> None:
        if self.resize is not None:
            self.resize(self.module, self.hidden)

    def sliced_copy(self, keep: torch.Tensor) -> nn.Module:
        new = copy.deepcopy(self.module)
        view = match_mlp(self.name, new)
        view.prune(keep)
        return new


def norm_or_none(m: nn.Module | None) -> nn.Module | None:
    """A hidden-dim norm, or None where the layout has an Identity in its place."""
    return None if m is None or isinstance(m, nn.Identity) else m


# ---- matchers: one per layout, registered by the family modules ---------------------------
Matcher = Callable[[str, nn.Module], "MLPView | None"]
_MLP_KINDS: Registry[Matcher] = Registry("MLP layout")
_EXAMPLES: Registry[Callable[[int, int], nn.Module]] = Registry("MLP layout example")


def register_mlp_kind(kind: str, example: Callable[[int, int], nn.Module] | None = None):
    """Decorator registering `matcher(name, module) -> MLPView | None` for a layout;
    `example(dim, hidden)` builds one such MLP for the contract tests."""
    def deco(fn: Matcher) -> Matcher:
        _MLP_KINDS.register(kind, fn)
        if example is not None:
            _EXAMPLES.register(kind, example)
        return fn
    return deco


def list_mlp_kinds() -> list[str]:
    return _MLP_KINDS.names()


def mlp_example(kind: str, dim: int = 16, hidden: int = 32) -> nn.Module | None:
    """A module of layout `kind` (input and output width `dim`), if the kind gives one."""
    return _EXAMPLES.get(kind)(dim, hidden) if kind in _EXAMPLES else None


def match_mlp(name: str, module: nn.Module) -> MLPView | None:
    """The view of `module` if some registered layout matches it."""
    for matcher in _MLP_KINDS.values():
        view = matcher(name, module)
        if view is not None:
            return view
    return None


_NOT_MLPS: set[str] = set()


def register_not_mlp(qualified_name: str) -> None:
    """`find_mlps` does not look inside modules of class `qualified_name` ("pkg.mod.Class"):
    an MLP there is not a block MLP (e.g. a relative-position MLP that maps coordinates to
    attention biases)."""
    _NOT_MLPS.add(qualified_name)


def _not_mlp(module: nn.Module) -> bool:
    return any(f"{c.__module__}.{c.__qualname__}" in _NOT_MLPS for c in type(module).__mro__)


def find_mlps(model: nn.Module) -> OrderedDict[str, MLPView]:
    """Ordered {qualified name: MLPView} of every MLP in `model`, in module order.
    Pure: the model is not changed (see `core.tp.mark_packed_gates`)."""
    found: OrderedDict[str, MLPView] = OrderedDict()
    skipped: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in [*found, *skipped]):
            continue
        if _not_mlp(module):
            skipped.append(name)
            continue
        view = match_mlp(name, module)
        if view is not None:
            found[name] = view
    return found
