"""Distil under the deepspeed launcher and keep the outputs of the in-memory student.

    deepspeed --num_gpus 2 --master_port PORT distill_zero3.py RECIPE RUN_DIR OUT.safetensors

Runs (or resumes) the run's `Distiller` exactly as `amp distill` does, then evaluates the engine's
student (ZeRO-3 gathers its shards) on the first digits test images and rank 0 writes
the tokens to OUT, for comparison with the consolidated model.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from amp_plugin.data import digits_splits
from amp_plugin.distill.engine import init_distributed
from amp_plugin.run import Run
from amp_plugin.run.recipe import load_recipe


def main() -> None:
    recipe_path, run_dir, out = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    recipe = load_recipe(recipe_path)
    init_distributed()
    run = Run(recipe, run_dir, show_progress=False)
    run.start(["distill"])
    distiller = run.distiller()
    result = distiller.run()
    probe = digits_splits(recipe.data, recipe.seed)["test"].images[:8]
    distiller.engine.eval()
    with torch.no_grad():
        pooled, patch = distiller.engine(probe.to(distiller.device, distiller.dtype))
    if dist.get_rank() == 0:
        save_file({"pooled": pooled.float().contiguous(), "patch": patch.float().contiguous(),
                   "steps": torch.tensor(result["steps"])}, out)


if __name__ == "__main__":
    main()
