"""Where a NaN or inf first appears: in the weights, in an input batch, or at the output
of a module during a forward pass. Scoring and the search would otherwise return sizes
computed from non-finite entropies without a word."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


class NonFiniteError(ValueError):
    """A non-finite value in a stage's inputs or computations; the message says where."""


def _finite(t) -> bool:
    return not (isinstance(t, torch.Tensor) and t.is_floating_point()) or bool(
        torch.isfinite(t).all())


def _tensors(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in _tensors(item)]
    return []


def check_inputs(stage: str, model: nn.Module, batches: Sequence, what: str) -> None:
    """Refuse non-finite weights (naming the parameter) or input batches (naming the batch).
    Streamed batches are checked by `locate` once a result goes non-finite instead."""
    for name, t in model.state_dict().items():
        if not _finite(t):
            raise NonFiniteError(f"{stage}: the model's {name} holds NaN or inf values")
    for i, batch in enumerate(batches):
        if not all(_finite(t) for t in _tensors(batch)):
            raise NonFiniteError(f"{stage}: {what} batch {i} holds NaN or inf values")


@torch.no_grad()
def locate(stage: str, model: nn.Module, batches: Sequence, what: str,
           forward: Callable[[torch.Tensor], object], first: int = 0) -> NonFiniteError:
    """The error naming the batch that holds NaN or inf, else the batch and the first module
    (in execution order) whose output is not finite although its inputs are; run when a
    computation went non-finite. Batches are numbered from `first`."""
    found: list[str] = []

    def hook(module, args, output, name=""):
        if not found and all(_finite(t) for t in _tensors(args)) and not all(
                _finite(t) for t in _tensors(output)):
            found.append(name)

    handles = [m.register_forward_hook(lambda m, a, o, n=n: hook(m, a, o, n))
               for n, m in model.named_modules() if n]
    try:
        for i, batch in enumerate(batches, start=first):
            if not all(_finite(t) for t in _tensors(batch)):
                return NonFiniteError(f"{stage}: {what} batch {i} holds NaN or inf values")
            forward(batch)
            if found:
                return NonFiniteError(f"{stage}: {what} batch {i}: the output of module "
                                      f"{found[0]} is the first non-finite value")
    finally:
        for h in handles:
            h.remove()
    return NonFiniteError(f"{stage}: a non-finite value appeared outside the model's modules "
                          f"(the criterion) on the {what} batches")
