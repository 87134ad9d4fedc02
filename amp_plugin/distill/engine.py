"""DeepSpeed's side of distillation: its process group (one rank without a launcher), the
CPU notices that do not apply kept out of the log, and the config a distill section
describes (ZeRO stage, offload, precision, optimizer)."""

from __future__ import annotations

import atexit
import contextlib
import io
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
from typing import Any

import torch
import torch.distributed as dist

from ..config import DistillConfig
from ..utils.dist import timeout as ddp_timeout
from ..utils.io import deep_merge
from ..utils.tensors import DTYPES


class _DropMessages(logging.Filter):
    def __init__(self, *starts: str):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


_QUIET = False
_SHM_BUILT = re.compile(r"^DeepSpeed \S+ built successfully$")


def quiet_cpu_engine() -> None:
    """Without CUDA, keep the CUDA and accelerator notices that do not apply out of the
    log, once per process, before DeepSpeed is imported: DeepSpeed is told the accelerator
    is the CPU (DS_ACCELERATOR, unless the user set it) instead of warning that it found
    none, and torch's note about a CUDA_HOME without a CUDA runtime is dropped."""
    global _QUIET
    if _QUIET or torch.cuda.is_available():
        return
    _QUIET = True
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.getLogger("torch.utils.cpp_extension").addFilter(
        _DropMessages("No CUDA runtime is found"))


@contextlib.contextmanager
def _without_build_notice():
    """Standard output as it is, but for DeepSpeed's notice that it built its CPU
    shared-memory all-reduce op (printed at every start; nothing to act on)."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        kept = [line for line in buffer.getvalue().splitlines(keepends=True)
                if not _SHM_BUILT.match(line.rstrip("\n"))]
        sys.stdout.write("".join(kept))


def init_distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank); a single-process group when no launcher set one up.

    DeepSpeed's init looks for MPI when the launcher's variables are missing, so a
    one-rank environment is set first; that group meets in a temporary file.
    """
    quiet_cpu_engine()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    alone: dict[str, Any] = {}
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                           ("LOCAL_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                           ("MASTER_PORT", str(port))):
            os.environ.setdefault(key, value)
        # alone, the group meets in a file, not on that port: another process may take the
        # port between choosing it and binding it (EADDRINUSE with several runs at once)
        store = tempfile.mkdtemp(prefix="amp-group-")
        atexit.register(shutil.rmtree, store, True)
        alone = dict(init_method=f"file://{os.path.join(store, 'store')}", rank=0,
                     world_size=1)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    with _without_build_notice():
        deepspeed.init_distributed(get_accelerator().communication_backend_name(),
                                   verbose=False, timeout=ddp_timeout(), **alone)
    _unlink_shm_workspace()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    get_accelerator().set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), local_rank


def _unlink_shm_workspace() -> None:
    """On CPU, DeepSpeed's shared-memory all-reduce maps one /dev/shm segment per rank and
    never unlinks it (69 MB of RAM each, per run, kept after exit). Once every rank has
    mapped all segments (the barrier), each rank removes its own name; mappings stay."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return
    dist.barrier()
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_"
            f"{os.environ.get('MASTER_ADDR')}_{os.environ.get('MASTER_PORT')}_{dist.get_rank()}")
    if os.path.exists(name):
        os.unlink(name)


def resolve_dtype(name: str, device: str) -> torch.dtype:
    from deepspeed.accelerator import get_accelerator

    if name == "auto":
        bf16 = device != "cpu" and get_accelerator().is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return DTYPES[name]


def deepspeed_config(cfg: DistillConfig, world_size: int, dtype: torch.dtype, lr: float,
                     device: str) -> dict:
    """The DeepSpeed config dict a recipe's distill section describes."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.offload_optimizer is not None:
        zero["offload_optimizer"] = cfg.offload_optimizer
    if cfg.offload_param is not None:
        zero["offload_param"] = cfg.offload_param
    offloaded = (cfg.offload_optimizer or {}).get("device", "none") != "none"
    config = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.batch_size * cfg.grad_accum * world_size,
        "optimizer": {"type": "AdamW", "params": {
            "lr": lr, "betas": list(cfg.betas), "weight_decay": cfg.weight_decay[0],
            # On a CPU-only machine torch's AdamW avoids compiling DeepSpeed's fused op.
            "torch_adam": device == "cpu" and not offloaded,
        }},
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "gradient_clipping": cfg.grad_clip or 0.0,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    return deep_merge(config, cfg.deepspeed)
