"""Distillation of the pruned model from the original, on DeepSpeed ZeRO."""

from .distiller import Distiller, read_loss_log
from .engine import deepspeed_config
from .inputs import DistillError, DistillPaths, TrainImages
from .losses import kl_entropy_loss, make_loss, token_mse_loss
from .schedule import WarmupCosine, param_groups, warmup_cosine
from .token_model import TokenModel

__all__ = ["DistillError", "DistillPaths", "Distiller", "TokenModel", "TrainImages",
           "WarmupCosine", "deepspeed_config", "kl_entropy_loss", "make_loss", "param_groups",
           "read_loss_log", "token_mse_loss", "warmup_cosine"]
