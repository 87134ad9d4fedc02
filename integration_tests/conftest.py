"""Shared fixtures: small real architectures with random weights, real digits images."""

from __future__ import annotations

import os

import pytest
import torch

import amp_plugin as amp
from amp_plugin.data import digits_raw, to_model_input

# `make test` runs two pytest workers on the two cores: one thread each (and in the processes
# a test starts), since two workers of two threads each wait on each other's cores
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(2)


@pytest.fixture
def one_thread():
    """One torch thread for the test (tiny tensors: one thread is many times faster than two
    on a busy CPU); the number before is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TIMM_KINDS = {
    "mlp": {},
    "glu": {"mlp_layer": "timm.layers.GluMlp", "act_layer": "torch.nn.SiLU", "mlp_ratio": 4},
    "swiglu": {"mlp_layer": "timm.layers.SwiGLU", "act_layer": "torch.nn.SiLU"},
}


def small_vit(kind: str = "mlp", seed: int = 0, depth: int = 3, **extra) -> torch.nn.Module:
    """A timm ViT with the real block code, random weights, 32x32 input."""
    torch.manual_seed(seed)
    kwargs = dict(img_size=32, patch_size=8, embed_dim=64, depth=depth, num_heads=4,
                  num_classes=0, **TIMM_KINDS[kind], **extra)
    return amp.create_model({"library": "timm", "name": "vit_small_patch16_224",
                             "kwargs": kwargs}).eval()


def small_open_clip(seed: int = 0) -> torch.nn.Module:
    """open_clip ViT-B-32 with its vision tower cut to 2 blocks (random weights)."""
    torch.manual_seed(seed)
    model = amp.create_model({"library": "open_clip", "name": "ViT-B-32"})
    model.visual.transformer.resblocks = model.visual.transformer.resblocks[:2]
    return model.eval()


def digit_images(n: int, size: int = 32, offset: int = 0) -> torch.Tensor:
    x, _ = digits_raw()
    return to_model_input(x[offset:offset + n], size, (0.5,) * 3, (0.5,) * 3)


@pytest.fixture(scope="session")
def images32() -> torch.Tensor:
    return digit_images(96)
