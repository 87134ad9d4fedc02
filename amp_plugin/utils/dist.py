"""Several processes (torchrun / deepspeed launchers): one process group and the few
collectives AMP needs (batches are sharded by `data.loader.amp_loader`)."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def timeout() -> timedelta:
    """How long a collective waits for the other ranks (env AMP_DIST_TIMEOUT_S, default
    1800 s): a stopped rank then fails the job instead of blocking it forever."""
    raw = os.environ.get("AMP_DIST_TIMEOUT_S", "1800")
    try:
        seconds = float(raw)
    except ValueError:
        raise ValueError(f"AMP_DIST_TIMEOUT_S: expected seconds, got {raw!r}") from None
    if seconds <= 0:
        raise ValueError(f"AMP_DIST_TIMEOUT_S: expected a positive number, got {raw!r}")
    return timedelta(seconds=seconds)


def init_from_env() -> bool:
    """Join the process group that torchrun/deepspeed describe in the environment."""
    already = dist.is_available() and dist.is_initialized()
    if already or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return already
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=timeout())
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    """Wait for every rank, at most `timeout()`: a stopped rank fails the job."""
    if not is_distributed():
        return
    try:
        dist.barrier()
    except RuntimeError as e:
        raise RuntimeError(f"rank {rank()}: the other ranks did not all arrive within "
                           f"{timeout().total_seconds():g} s (AMP_DIST_TIMEOUT_S): "
                           f"{str(e).splitlines()[0]}") from None


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if (
        dist.get_backend() == "nccl") else torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over ranks (a new tensor on t's device); `t` itself when alone."""
    if not is_distributed():
        return t
    out = t.to(_collective_device()).clone()
    dist.all_reduce(out)
    return out.to(t.device)


def agree(value: float) -> float:
    """The mean of a float over ranks, so that every rank takes the same decision bit for
    bit (each computes it from the same global batches, up to reduction order)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    return float(all_reduce_sum(t).item()) / world_size()


def global_batch_size(local: int) -> int:
    return int(all_reduce_sum(torch.tensor([local], dtype=torch.long)).item())
