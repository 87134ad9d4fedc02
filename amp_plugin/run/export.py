"""`amp export RUN_DIR`: a run's pruned, distilled or original model to a file that runs
without amp (see `amp_plugin.export`), checked on the run's own validation images and
written with the run's preprocessing (data.image_size, mean, std)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..core.serialization import is_pruned_dir, load_pruned
from ..data import get_source
from ..export import export_model, get_format
from .layout import MODEL_ROLES, RunDir
from .pipeline import Run
from .recipe import load_recipe

EXPORT_ROLES = (*MODEL_ROLES, "original")


def run_images(recipe, model: nn.Module, n: int) -> torch.Tensor:
    """The first `n` validation images of the run's data, as the search saw them."""
    _, val = get_source(recipe.data.kind).amp_datasets(recipe.data, recipe.seed, model=model,
                                                       show_progress=False)
    items = [val[i] for i in range(min(n, len(val)))]
    return torch.stack([x[0] if isinstance(x, (tuple, list)) else x for x in items])


def export_run(run_dir: str | Path, format: str = "onnx", model: str = "pruned",
               out: str | Path | None = None, images: int = 8, project: bool = True,
               atol: float = 1e-4, rtol: float = 1e-4) -> dict:
    """Export the run's `model` (pruned, distilled or original) in `format` to `out`
    (default RUN_DIR/export/<model><suffix>); returns what is written beside the file
    (`<file>.json`: preprocessing, shapes, the check against PyTorch) and its `path`."""
    fmt = get_format(format)
    if model not in EXPORT_ROLES:
        raise ValueError(f"model: expected one of {', '.join(EXPORT_ROLES)}, got {model!r}")
    if images < 1:
        raise ValueError(f"images: expected at least 1 image to check the export on, "
                         f"got {images}")
    rd = RunDir(run_dir)
    if not rd.is_run():
        raise FileNotFoundError(f"{rd.root} is not a run directory: it has no "
                                f"{rd.recipe.name}")
    recipe = load_recipe(rd.recipe, check_paths=False)
    if model == "original":
        net = Run(recipe, rd.root, show_progress=False).original()
    elif is_pruned_dir(rd.model_dir(model)):
        net = load_pruned(rd.model_dir(model))
    else:
        stage = {"pruned": "prune", "distilled": "distill"}[model]
        raise FileNotFoundError(f"{rd.model_dir(model)}: the run has no {model} model "
                                f"(run the {stage} stage first)")
    path = Path(out) if out is not None else rd.exports / f"{model}{fmt.suffix}"
    d = recipe.data
    record = export_model(net, path, format, run_images(recipe, net, images),
                        image_size=d.image_size, mean=d.mean, std=d.std, project=project,
                        atol=atol, rtol=rtol,
                        source={"run": recipe.name, "model": model,
                                "architecture": f"{recipe.model.library}:{recipe.model.name}"})
    return {**record, "path": str(path)}
