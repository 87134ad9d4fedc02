"""Stage outputs read back from a run directory are input like any other: edited, damaged
or replaced files must not reach the search. Scores and partial sums are checked against
the model's MLPs (names, one finite float per hidden neuron), search results against the
widths they were cut from; a file that fails is named with what is wrong."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from ..core.adapter import vision_tower
from ..core.mlp import find_mlps
from ..search.greedy import SearchState


class StageOutputError(ValueError):
    """A stage output that cannot be used as it is (the message names the file)."""


def mlp_widths(model: nn.Module) -> dict[str, int]:
    """{MLP name: hidden width} of a model's vision tower."""
    tower, _ = vision_tower(model)
    return {n: v.hidden for n, v in find_mlps(tower).items()}


def read_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; any damage (a header claiming more than
    the file holds, a truncated file, not safetensors at all) named with the file."""
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise StageOutputError(f"{path}: not a readable safetensors file ({e})") from None


def check_neuron_values(path: str | Path, tensors: dict[str, torch.Tensor],
                        widths: dict[str, int]) -> dict[str, torch.Tensor]:
    """`tensors` if they hold one finite float per hidden neuron of each MLP, else an error
    naming the file, the MLP and what was found."""
    if set(tensors) != set(widths):
        missing, extra = sorted(set(widths) - set(tensors)), sorted(set(tensors) - set(widths))
        raise StageOutputError(f"{path}: holds other MLPs than the model's (missing "
                               f"{missing[:4]}, unexpected {extra[:4]})")
    for name, width in widths.items():
        t = tensors[name]
        if not t.is_floating_point():
            raise StageOutputError(f"{path}: {name} is {str(t.dtype).removeprefix('torch.')}, "
                                   "expected floating-point values")
        if tuple(t.shape) != (width,):
            raise StageOutputError(f"{path}: {name} has shape {tuple(t.shape)}, the model's "
                                   f"MLP has {width} hidden neurons")
        if not bool(torch.isfinite(t).all()):
            raise StageOutputError(f"{path}: {name} holds NaN or inf values")
    return tensors


def check_prune_result(path: str | Path, result: Any, widths: dict[str, int] | None = None
                       ) -> dict:
    """A search result (prune.json's `result`) whose sizes are whole numbers between 0 and
    the width they were cut from (`widths`, the original model's, when known; else the
    result's own `original_sizes`)."""
    if not isinstance(result, dict):
        raise StageOutputError(f"{path}: result is {type(result).__name__}, expected an object")
    sizes, original = result.get("hidden_sizes"), result.get("original_sizes")
    for key, value in (("hidden_sizes", sizes), ("original_sizes", original)):
        if not isinstance(value, dict) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value.values()):
            raise StageOutputError(f"{path}: result.{key} is {value!r:.80}, expected an "
                                   "object of whole numbers")
    widths = original if widths is None else widths
    if original != widths:
        raise StageOutputError(f"{path}: result.original_sizes {original} are not the "
                               f"model's MLP widths {widths}")
    if set(sizes) != set(widths):
        raise StageOutputError(f"{path}: result.hidden_sizes names other MLPs than the "
                               f"model's: {sorted(set(sizes) ^ set(widths))[:4]}")
    for name, size in sizes.items():
        if not 0 <= size <= widths[name]:
            raise StageOutputError(f"{path}: result.hidden_sizes.{name} is {size}, outside "
                                   f"0..{widths[name]} (the MLP's hidden width)")
    return result


def check_search_state(path: str | Path, saved: Any, fp: str, widths: dict[str, int]
                       ) -> SearchState | None:
    """The search state of a killed prune stage (prune.partial.json) to resume from: None
    when it was saved for other inputs; an error when its content is not a state of a
    search over these MLPs."""
    if not isinstance(saved, dict) or saved.get("fingerprint") != fp:
        return None
    d = saved.get("state")
    try:
        state = SearchState.from_dict(d)
    except (KeyError, TypeError, ValueError) as e:
        raise StageOutputError(f"{path}: not a search state ({type(e).__name__}: {e})") from None
    for name, size in state.sizes.items():
        if name not in widths or isinstance(size, bool) or not isinstance(size, int) or not (
                0 <= size <= widths[name]):
            raise StageOutputError(f"{path}: state.sizes.{name} is {size!r}, not a size of "
                                   "one of the model's MLPs")
    for key in ("e_prev", "e_start"):
        value = getattr(state, key)
        if value is not None and (isinstance(value, bool) or not isinstance(
                value, (int, float)) or not math.isfinite(value)):
            raise StageOutputError(f"{path}: state.{key} is {value!r}, expected a finite "
                                   "entropy")
    if state.evaluations < 0:
        raise StageOutputError(f"{path}: state.evaluations is {state.evaluations}")
    return state
