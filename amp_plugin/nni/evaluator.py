"""`entropy_evaluator`: a TorchEvaluator whose training step is AMP's label-free entropy,
so that NNI's own `TaylorPruner` scores neurons with AMP's criterion."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import nni
import torch
from nni.compression import TorchEvaluator
from torch import nn

from ..core.adapter import vision_tower
from ..core.criterion import make_criterion
from ..utils.progress import progress
from ..utils.tensors import split_batch, to_device

FeatureFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _tower_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    tower, adapter = vision_tower(model)
    return adapter.features(tower, images)


def entropy_evaluator(
    model: nn.Module,
    calib_batches: Sequence,
    inv_temperature: float = 20.0,
    criterion: str = "entropy",
    feature_fn: FeatureFn | None = None,
    show_progress: bool = True,
) -> TorchEvaluator:
    """A TorchEvaluator whose training step is AMP's label-free criterion.

    Give it to NNI's `TaylorPruner(model, config_list, evaluator, training_steps=N)`: each
    step runs one calibration batch forward and backward, so Taylor scores rank neurons by
    the entropy instead of a labelled loss. The optimizer is SGD with lr 0: the steps only
    collect gradients and leave the weights as they are. Runs in eval mode (no dropout or
    drop-path), like AMP's own scoring. Build it before the pruner (NNI needs the optimizer
    on the unwrapped model).
    """
    batches = [split_batch(b) for b in calib_batches]
    if not batches:
        raise ValueError("calib_batches is empty")
    loss_fn = make_criterion(criterion, inv_temperature)
    features = feature_fn or _tower_features

    def training_step(batch, model: nn.Module) -> torch.Tensor:
        images, extra = batch
        return loss_fn(features(model, images), extra)

    def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None,
                      max_epochs=None):
        device = next(model.parameters()).device
        steps = max_steps if max_steps else len(batches) * (max_epochs or 1)
        was_training = model.training
        model.eval()
        try:
            for step in progress(range(steps), "entropy Taylor steps", show_progress):
                images, extra = batches[step % len(batches)]
                extra = to_device(extra, device)
                optimizers.zero_grad(set_to_none=True)
                training_step((images.to(device), extra), model).backward()
                optimizers.step()
        finally:
            model.train(was_training)

    optimizer = nni.trace(torch.optim.SGD)(model.parameters(), lr=0.0)
    return TorchEvaluator(training_func, optimizer, training_step)
