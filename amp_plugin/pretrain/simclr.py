"""Label-free pre-training of the demo teacher (SimCLR on the digits images).

The paper's models (CLIP, DINOv2) are trained without class labels; on such features
pruning raises the batch entropy, which is what AMP's one-sided test assumes. (On a
supervised classifier's pre-logits it falls instead; see PAPER-FACTS.md.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import vision_tower
from ..data.transforms import to_model_input
from ..utils.progress import progress


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random affine (rotation, scale, shift) and contrast jitter of (N, 1, h, w) images in
    [0, 1], one draw per image, vectorised with affine_grid/grid_sample."""
    n = x.shape[0]

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    angle = uniform(-0.3, 0.3)
    scale = uniform(0.8, 1.15)
    tx, ty = uniform(-0.2, 0.2), uniform(-0.2, 0.2)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
    gain = uniform(0.7, 1.3).view(n, 1, 1, 1)
    return (out * gain).clamp(0, 1)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalised-temperature cross-entropy over the 2N views."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))
    n = z1.shape[0]
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(sim, targets)


def train_simclr(
    model: nn.Module,
    images: torch.Tensor,
    image_size: int,
    mean,
    std,
    epochs: int,
    batch_size: int,
    lr: float,
    temperature: float,
    seed: int,
    show_progress: bool = True,
) -> list[float]:
    """Train `model`'s pooled features with SimCLR on raw (N, 1, h, w) images in [0, 1].
    Returns the mean loss of each epoch."""
    # One thread: CPU float reductions then run in a fixed order, so the same seed gives
    # the same teacher on every machine of a kind (with 2 threads the teachers differed).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(model, images, image_size, mean, std, epochs, batch_size, lr,
                      temperature, seed, show_progress)
    finally:
        torch.set_num_threads(threads)


def _train(model, images, image_size, mean, std, epochs, batch_size, lr, temperature, seed,
           show_progress) -> list[float]:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    tower, adapter = vision_tower(model)
    with torch.no_grad():
        dim = adapter.features(tower, to_model_input(images[:2], image_size, mean, std)).shape[-1]
    projector = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 64))
    params = list(model.parameters()) + list(projector.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    steps_per_epoch = len(images) // batch_size
    total = epochs * steps_per_epoch
    warmup = max(1, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / total)))
    model.train()
    history = []
    for _ in progress(range(epochs), "SimCLR pre-training (digits)", enabled=show_progress):
        order = torch.randperm(len(images), generator=g)
        losses = []
        for s in range(steps_per_epoch):
            raw = images[order[s * batch_size:(s + 1) * batch_size]]
            views = [to_model_input(augment(raw, g), image_size, mean, std) for _ in range(2)]
            z1, z2 = (projector(adapter.features(tower, v)) for v in views)
            loss = nt_xent(z1, z2, temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        history.append(sum(losses) / len(losses))
    model.eval()
    return history
