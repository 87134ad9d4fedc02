"""Small torch helpers used across the package: dtype and device names, batches."""

from __future__ import annotations

import torch
from torch import nn

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bf16": torch.bfloat16,
                                  "fp16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str = "auto") -> torch.device:
    """'auto': the current CUDA device when there is one, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    return torch.device(name)


def require_materialized(model: nn.Module, arg: str = "model") -> None:
    """Refuse a model whose parameters are on the meta device (shapes without values)."""
    meta = next((n for n, p in model.named_parameters() if p.is_meta), None)
    if meta is not None:
        raise ValueError(f"{arg}: parameter {meta} is on the meta device (shapes without "
                         "values); load its weights first (model.to_empty(device=...) then "
                         "load_state_dict)")


def device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def split_batch(batch) -> tuple[torch.Tensor, object]:
    """(images, extra) from a tensor or a tuple/list whose first element is the images."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise TypeError(f"a batch must be a tensor or a (images, ...) tuple, got {type(batch)}")


def to_device(x, device):
    """Tensors moved to `device`; anything else as it is."""
    return x.to(device) if isinstance(x, torch.Tensor) else x


def cast_batch(batch, device, dtype):
    """A batch (tensor or tuple) on `device`, floating tensors in `dtype`."""
    def one(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.to(device, dtype)
        return to_device(t, device)
    return tuple(one(t) for t in batch) if isinstance(batch, (tuple, list)) else one(batch)


class CastBatches:
    """`batches` (a list or a loader) re-iterable with each batch cast by `cast_batch`."""

    def __init__(self, batches, device, dtype):
        self.batches, self.device, self.dtype = batches, device, dtype

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return (cast_batch(b, self.device, self.dtype) for b in self.batches)
