"""Global allocation by KL against uniform sizes and the authors' rule, on the committed demo
teacher (recipes/teachers/demo_digits) with the demo recipe's calibration and validation
images.

    python examples/global_allocation.py --out runs/global_allocation [--budgets 0.2 0.35 0.5]

For each budget (a fraction of the MLP parameters kept):
  global   AMPPruner(..., measure="kl", allocation="global", target={"mlp_params": b})
  uniform  the same MLP parameters in every block (each block's top-scored neurons)
and for reference the authors' rule at the recipe's threshold. For each: the sizes, the MLP
parameters kept and KL(original || pruned) of the batch-similarity distributions over all
validation images (the distortion the allocation minimises), and the search's cost in
image-block forwards. Then the curves on the first 128, 256, ... validation images: the
allocation they give at the middle budget, to see how many images it needs before it stops
changing. Results: tables on the terminal and global_allocation.json in the output folder.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import amp_plugin as amp
from amp_plugin.bench.search import kl_to_original
from amp_plugin.data import amp_loader
from amp_plugin.run.pipeline import Run
from amp_plugin.search.greedy import keep_order
from amp_plugin.utils.io import write_json


def uniform(teacher, scores, mlp_params: int, example):
    """The same number of neurons in every MLP, as close to `mlp_params` as whole neurons
    allow (each block's top-scored neurons)."""
    model = copy.deepcopy(teacher)
    tower, _ = amp.vision_tower(model)
    views = amp.find_mlps(tower)
    fixed = sum(v.param_counts()[0] for v in views.values())
    per = sum(v.param_counts()[1] for v in views.values())
    size = max(1, round((mlp_params - fixed) / per))
    amp.prune_mlps(tower, example, {n: keep_order(scores[n])[:size].sort().values
                                    for n in views})
    return model


def mlp_params(model) -> int:
    return sum(v.num_params() for v in amp.find_mlps(amp.vision_tower(model)[0]).values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/global_allocation"))
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.2, 0.35, 0.5])
    parser.add_argument("--curve-images", type=int, nargs="+", default=[128, 256, 384, 512])
    args = parser.parse_args()
    torch.manual_seed(0)
    recipe = amp.load_recipe("demo_digits")
    run = Run(recipe, args.out / "run", show_progress=False)
    teacher = run.original().eval()
    calib, val = run.datasets()
    bs = recipe.data.batch_size
    cb = list(amp_loader(calib, bs, 0, True))
    vb = list(amp_loader(val, bs, 0, True))
    a = recipe.amp
    imp = amp.AMPImportance(a.inv_temperature, show_progress=False)
    scores = imp.accumulate(teacher, cb)
    example = vb[0][:1]
    before = mlp_params(teacher)

    def pruner(model, **kw):
        return amp.AMPPruner(model, example, amp.AMPImportance(a.inv_temperature,
                                                               show_progress=False)
                             .load_scores(scores, model), vb, a.threshold, a.max_steps,
                             show_progress=False, **kw)

    def kl(model) -> float:
        return kl_to_original(teacher, model, vb, a.inv_temperature)

    rows, out = [], {"budgets": {}, "validation_images": len(vb) * bs}
    authors = copy.deepcopy(teacher)
    res = pruner(authors).step()
    out["authors_rule"] = {"hidden_sizes": res.hidden_sizes,
                           "kept": mlp_params(authors) / before, "kl": kl(authors),
                           "image_block_forwards": res.extra["image_block_forwards"]}
    rows.append(("authors' rule", f"{out['authors_rule']['kept']:.1%}", res.hidden_sizes,
                 out["authors_rule"]["kl"], res.extra["image_block_forwards"]))
    for b in args.budgets:
        glob = copy.deepcopy(teacher)
        res = pruner(glob, measure="kl", allocation="global", target={"mlp_params": b}).step()
        alloc = res.extra["allocation"]
        uni = uniform(teacher, scores, res.mlp_params["after"], example)
        sizes_u = {n: v.hidden for n, v in amp.find_mlps(amp.vision_tower(uni)[0]).items()}
        entry = {"global": {"hidden_sizes": res.hidden_sizes, "kept": mlp_params(glob) / before,
                            "kl": kl(glob), "verified": alloc["verified"],
                            "predicted": alloc["predicted"],
                            "image_block_forwards": alloc["image_block_forwards"],
                            "curve_points": alloc["curve_points"]},
                 "uniform": {"hidden_sizes": sizes_u, "kept": mlp_params(uni) / before,
                             "kl": kl(uni)}}
        out["budgets"][str(b)] = entry
        rows.append((f"global KL, {b:.0%}", f"{entry['global']['kept']:.1%}", res.hidden_sizes,
                     entry["global"]["kl"], alloc["image_block_forwards"]["total"]))
        rows.append((f"uniform, {b:.0%}", f"{entry['uniform']['kept']:.1%}", sizes_u,
                     entry["uniform"]["kl"], 0))
    table = Table(title=f"demo teacher, {out['validation_images']} validation images")
    for col in ("sizes by", "MLP params kept", "hidden sizes (blocks 0-3)", "KL to original",
                "image-block forwards"):
        table.add_column(col)
    for name, kept, sizes, value, cost in rows:
        table.add_row(name, kept, " ".join(str(s) for s in sizes.values()), f"{value:.5f}",
                      f"{cost:,}" if cost else "-")
    console = Console(width=140)
    console.print(table)

    mid = args.budgets[len(args.budgets) // 2]
    stability = Table(title=f"curve images vs the allocation at {mid:.0%} (verification on all "
                            f"{out['validation_images']})")
    for col in ("curve images", "hidden sizes", "verified KL", "curve image-block forwards"):
        stability.add_column(col)
    out["curve_images"] = {}
    for n in args.curve_images:
        model = copy.deepcopy(teacher)
        res = pruner(model, measure="kl", allocation={"curve_images": n},
                     target={"mlp_params": mid}).step()
        alloc = res.extra["allocation"]
        out["curve_images"][str(n)] = {"hidden_sizes": res.hidden_sizes,
                                       "verified": alloc["verified"],
                                       "curves": alloc["image_block_forwards"]["curves"]}
        stability.add_row(str(n), " ".join(str(s) for s in res.hidden_sizes.values()),
                          f"{alloc['verified']:.5f}",
                          f"{alloc['image_block_forwards']['curves']:,}")
    console.print(stability)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "global_allocation.json", out)
    console.print(f"written: {args.out / 'global_allocation.json'}")


if __name__ == "__main__":
    main()
