"""Distillation losses (docs/algorithm.md section 5): MSE of pooled features and patch
tokens, or a symmetric KL between the batch similarity distributions."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..config import DistillConfig
from ..core.criterion import gather_features


def token_mse_loss(student: tuple[torch.Tensor, torch.Tensor],
                   teacher: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """MSE(pooled) + MSE(patch tokens), in float32."""
    return (F.mse_loss(student[0].float(), teacher[0].float())
            + F.mse_loss(student[1].float(), teacher[1].float()))


def similarity_log_probs(features: torch.Tensor, inv_temperature: float) -> torch.Tensor:
    """log p of docs/algorithm.md section 1 over the global batch (all ranks)."""
    n = F.normalize(gather_features(features).float(), dim=-1)
    return F.log_softmax(inv_temperature * n @ n.t(), dim=1)


def kl_entropy_loss(student: tuple[torch.Tensor, torch.Tensor],
                    teacher: tuple[torch.Tensor, torch.Tensor],
                    inv_temperature: float) -> torch.Tensor:
    """0.5 * (KL(p_t || p_s) + KL(p_s || p_t)) of the pooled features' similarity rows,
    averaged over the images of the global batch."""
    log_s = similarity_log_probs(student[0], inv_temperature)
    log_t = similarity_log_probs(teacher[0].detach(), inv_temperature)
    kl_ts = F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")
    kl_st = F.kl_div(log_t, log_s, log_target=True, reduction="batchmean")
    return 0.5 * (kl_ts + kl_st)


def make_loss(cfg: DistillConfig):
    if cfg.loss == "mse":
        return token_mse_loss
    return functools.partial(kl_entropy_loss, inv_temperature=cfg.inv_temperature)
