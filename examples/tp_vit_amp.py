"""Torch-Pruning's ViT pruning flow (its examples/transformers/prune_timm_vit.py: build the
model, build a MetaPruner with the attention heads and the classifier ignored, accumulate
the importance, step) with AMPImportance as the importance, offline.

    python examples/tp_vit_amp.py --model vit_base_patch16_siglip_224
    python examples/tp_vit_amp.py --model eva02_tiny_patch14_224

Random weights at reduced depth and width on scikit-learn's digits images (nothing is
downloaded), so the numbers show the mechanics, not accuracy. Compared with Torch-Pruning's
script, four lines change; they are marked "AMP:".
"""

from __future__ import annotations

import argparse

import timm
import torch
import torch_pruning as tp

import amp_plugin as amp
from amp_plugin.core.cost import count_flops, count_params
from amp_plugin.data import digits_raw, to_model_input


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_siglip_224")
    parser.add_argument("--pruning_ratio", type=float, default=0.5)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, img_size=64, depth=args.depth,
                              embed_dim=args.width, num_heads=4, num_classes=0).eval()
    x, _ = digits_raw()
    images = to_model_input(x[:256], 64, (0.5,) * 3, (0.5,) * 3)
    calib = list(images.split(64))
    example_inputs = images[:1]
    base_flops, base_params = count_flops(model, example_inputs), count_params(model)
    mlps_before = {n: v.hidden for n, v in amp.find_mlps(model).items()}

    num_heads = {m.qkv: m.num_heads for m in model.modules()
                 if isinstance(m, timm.models.vision_transformer.Attention)}
    imp = amp.AMPImportance(inv_temperature=20.0)  # AMP: instead of GroupTaylorImportance()
    amp.prepare(model)  # AMP: packed gated MLPs (EVA02, DINOv2-g) get their own pruner
    pruner = tp.pruner.MetaPruner(
        model, example_inputs, importance=imp, pruning_ratio=args.pruning_ratio,
        ignored_layers=[model.head], num_heads=num_heads,
        customized_pruners=amp.customized_pruners(),  # AMP: the pruner for packed gates
    )
    imp.accumulate(model, calib)  # AMP: label-free scores, instead of the labelled backward loop
    for group in pruner.step(interactive=True):
        group.prune()

    flops, params = count_flops(model, example_inputs), count_params(model)
    print(f"{args.model} (depth {args.depth}, width {args.width}, random weights)")
    print(f"MLP hidden sizes: {mlps_before} -> "
          f"{ {n: v.hidden for n, v in amp.find_mlps(model).items()} }")
    print(f"FLOPs: {base_flops / 1e6:.1f} M -> {flops / 1e6:.1f} M, "
          f"params: {base_params / 1e6:.2f} M -> {params / 1e6:.2f} M")
    with torch.no_grad():
        print(f"output shape: {tuple(model(example_inputs).shape)}")


if __name__ == "__main__":
    main()
