"""DeepSpeed checkpoints read safely: every checkpoint file is inspected before DeepSpeed
loads it, and loads are weights-only with DeepSpeed's few state classes allowed, so a
pickle planted in the run directory is refused instead of run; `latest` must name one of
ours."""

from __future__ import annotations

import contextlib
import os
import pickle
import re
from pathlib import Path

import torch

from .inputs import DistillError

# DeepSpeed's own state classes in its checkpoints (loss scaler, ZeRO stage, fragment
# addresses); everything else must be tensors and plain data.
CHECKPOINT_CLASSES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def _checkpoint_class(name: str) -> type:
    import importlib

    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


@contextlib.contextmanager
def weights_only_loads(folder: Path):
    """Inside: every `torch.load` is weights-only (DeepSpeed passes weights_only=False,
    which would run any pickle planted in the run directory), with DeepSpeed's few state
    classes allowed. Each checkpoint file of `folder` is inspected first, without
    executing it, so a refusal names the file and what it would have imported."""
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix == ".pt"):
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(f))
        except Exception as e:  # not a torch zip archive: a bare pickle or damaged file
            raise DistillError(f"{f}: refused: not a torch checkpoint archive ({e})") from None
        unsafe = sorted(set(unsafe) - set(CHECKPOINT_CLASSES))
        if unsafe:
            raise DistillError(f"{f}: refused: the checkpoint would import {unsafe[:3]}, "
                               "not tensors or DeepSpeed state; it was not written by amp (delete "
                               f"{folder.parent} to distil from the start)")
    saved = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"  # read by torch.load on every call
    try:
        with torch.serialization.safe_globals([_checkpoint_class(c)
                                               for c in CHECKPOINT_CLASSES]):
            yield
    except pickle.UnpicklingError as e:
        raise DistillError(f"{folder}: refused a checkpoint that is not weights-only data "
                           f"({str(e).splitlines()[0]})") from None
    finally:
        if saved is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = saved


def read_tag(checkpoints: Path) -> str:
    """The checkpoint tag `latest` names, refused unless it is one of ours (no paths)."""
    tag = (checkpoints / "latest").read_text().strip()
    if not re.fullmatch(r"global_step\d+", tag) or not (checkpoints / tag).is_dir():
        raise DistillError(f"{checkpoints / 'latest'}: names {tag!r}, not a checkpoint "
                           "folder global_stepN of this directory")
    return tag


def step_tag(step: int) -> str:
    return f"global_step{step}"


def tag_step(tag: str) -> int:
    return int(tag.removeprefix("global_step"))
