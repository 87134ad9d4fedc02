"""AMP inside NNI 3.0: the AMP pruner with NNI's interface, NNI masks to a smaller model,
and an evaluator that makes NNI's TaylorPruner score on AMP's entropy."""

from .evaluator import entropy_evaluator
from .masks import MaskError, apply_nni_masks, check_maskable, plan_from_masks
from .pruner import AMPNNIPruner, select_mlps

__all__ = ["AMPNNIPruner", "MaskError", "apply_nni_masks", "check_maskable",
           "entropy_evaluator", "plan_from_masks", "select_mlps"]
