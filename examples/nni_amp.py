"""AMP from NNI 3.0, offline, on a small timm ViT and the scikit-learn digits images.

    python examples/nni_amp.py --out runs/nni_amp

1. NNI's `L1NormPruner` masks the MLP input linears; NNI's `ModelSpeedup` is tried on them
   (it fails on torch 2.x with a timm ViT; the error is recorded) and `apply_nni_masks`
   shrinks the model instead.
2. NNI's `TaylorPruner`, driven by AMP's entropy through a `TorchEvaluator`, masks half of
   every MLP; `apply_nni_masks` shrinks it.
3. `AMPNNIPruner` searches each MLP's size; its masks, applied, give the same sizes and
   outputs as the native `AMPPruner` with the same scores and validation images.

The model has random weights (nothing is downloaded), so the sizes only show the mechanics.
Results: a table on the terminal and `nni_amp.json` in the output folder.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import warnings
from pathlib import Path

import timm
import torch
from nni.compression.pruning import L1NormPruner, TaylorPruner
from rich.console import Console
from rich.table import Table

from amp_plugin import AMPImportance, AMPPruner
from amp_plugin.data import batches, digits_raw, to_model_input
from amp_plugin.nni import AMPNNIPruner, apply_nni_masks, entropy_evaluator


def build_model(depth: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32,
                             patch_size=8, embed_dim=64, depth=depth, num_heads=2,
                             num_classes=0).eval()


def digits_batches(seed: int, batch_size: int = 64):
    x, _ = digits_raw()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    images = to_model_input(x[order[:512]], 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    return batches(images[:256], batch_size), batches(images[256:], batch_size), images[:2]


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def max_diff(a: torch.Tensor, model: torch.nn.Module, images: torch.Tensor) -> float:
    return float((a - model(images)).abs().max())


def try_model_speedup(model: torch.nn.Module, masks, example: torch.Tensor) -> str:
    """NNI's own way to shrink a masked model; returns 'ok' or the error it raises."""
    from nni.compression.speedup import ModelSpeedup

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ModelSpeedup(copy.deepcopy(model), example, masks).speedup_model()
        return "ok"
    except Exception as e:  # recorded, not raised: the point is to show what NNI does
        return f"{type(e).__name__}: {e}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/nni_amp", help="output folder")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--threshold", type=float, default=3e-3, help="AMP's allowed entropy rise")
    ap.add_argument("--inv-temperature", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.depth < 1 or args.threshold < 0 or args.inv_temperature <= 0:
        ap.error("--depth must be >= 1, --threshold >= 0 and --inv-temperature > 0")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    calib, val, example = digits_batches(args.seed)
    probe = torch.cat(val)[:32]
    base = build_model(args.depth, args.seed)
    with torch.no_grad():
        base_out = base(probe)
    report: dict = {"model": "timm vit_small_patch16_224 (img 32, patch 8, dim 64, "
                             f"depth {args.depth}, random weights)",
                    "params_before": n_params(base), "methods": {}}
    fc1 = [{"op_types": ["Linear"], "op_names_re": [r"blocks\.\d+\.mlp\.fc1"],
            "sparse_ratio": 0.5}]

    # 1. NNI's L1NormPruner; NNI's ModelSpeedup vs apply_nni_masks
    model = copy.deepcopy(base)
    pruner = L1NormPruner(model, fc1)
    _, masks = pruner.compress()
    with torch.no_grad():
        masked = model(probe)
    pruner.unwrap_model()
    report["model_speedup"] = try_model_speedup(model, masks, example)
    sizes = apply_nni_masks(model, masks, example)
    report["methods"]["L1Norm 0.5"] = dict(
        hidden_sizes=sizes, params_after=n_params(model),
        max_abs_diff_vs_masked=max_diff(masked, model, probe))

    # 2. NNI's TaylorPruner on AMP's entropy
    model = copy.deepcopy(base)
    evaluator = entropy_evaluator(model, calib, args.inv_temperature)
    pruner = TaylorPruner(model, fc1, evaluator, training_steps=len(calib))
    _, masks = pruner.compress()
    with torch.no_grad():
        masked = model(probe)
    pruner.unwrap_model()
    sizes = apply_nni_masks(model, masks, example)
    report["methods"]["Taylor(entropy) 0.5"] = dict(
        hidden_sizes=sizes, params_after=n_params(model),
        max_abs_diff_vs_masked=max_diff(masked, model, probe))

    # 3. AMP through NNI vs native AMP, same scores and validation images
    scores = AMPImportance(args.inv_temperature).accumulate(copy.deepcopy(base), calib)
    model = copy.deepcopy(base)
    pruner = AMPNNIPruner(model, [{"op_types": ["Mlp"]}], val_batches=val,
                          threshold=args.threshold,
                          importance=AMPImportance(args.inv_temperature).load_scores(scores))
    _, masks = pruner.compress()
    with torch.no_grad():
        masked = model(probe)
    pruner.unwrap_model()
    sizes = apply_nni_masks(model, masks, example)
    native = copy.deepcopy(base)
    result = AMPPruner(native, example,
                       AMPImportance(args.inv_temperature).load_scores(scores, native), val,
                       args.threshold).step()
    with torch.no_grad():
        native_out = native(probe)
    report["methods"]["AMP via NNI"] = dict(
        hidden_sizes=sizes, params_after=n_params(model),
        max_abs_diff_vs_masked=max_diff(masked, model, probe),
        max_abs_diff_vs_native=max_diff(native_out, model, probe),
        entropy=pruner.search.entropy, evaluations=pruner.search.evaluations)
    report["methods"]["AMP native"] = dict(
        hidden_sizes=result.hidden_sizes, params_after=n_params(native),
        entropy=result.entropy, evaluations=result.evaluations)
    report["max_abs_output_change_by_amp"] = max_diff(base_out, native, probe)
    report["settings"] = vars(args)

    original = base.blocks[0].mlp.fc1.out_features
    table = Table(title=f"MLP hidden sizes after pruning (of {original})")
    table.add_column("")
    for method in report["methods"]:
        table.add_column(method, justify="right")
    rows = report["methods"].values()
    for name in sizes:
        table.add_row(name, *[str(r["hidden_sizes"][name]) for r in rows])
    table.add_row("params", *[f"{r['params_after']:,}" for r in rows])
    table.add_row("|masked - shrunk|", *[f"{r['max_abs_diff_vs_masked']:.1e}"
                                         if "max_abs_diff_vs_masked" in r else "-" for r in rows])
    console = Console()
    console.print(table)
    console.print(f"parameters before pruning: {report['params_before']:,}")
    console.print(f"AMP via NNI vs native AMP, max |output difference|: "
                  f"{report['methods']['AMP via NNI']['max_abs_diff_vs_native']:.1e}")
    console.print(f"NNI ModelSpeedup on the L1NormPruner masks: {report['model_speedup']}")

    path = out_dir / "nni_amp.json"
    with tempfile.NamedTemporaryFile("w", dir=out_dir, suffix=".tmp", delete=False) as f:
        json.dump(report, f, indent=2)
    os.replace(f.name, path)
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
