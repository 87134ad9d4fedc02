"""AMP: Adaptive MLP Pruning for large vision transformers, as a Torch-Pruning plugin.

The plugin (Torch-Pruning style):

    import amp_plugin as amp
    imp = amp.AMPImportance(inv_temperature=20)
    imp.accumulate(model, calib_batches)                      # Taylor scores, label-free
    result = amp.AMPPruner(model, example, imp, val_batches, threshold=5e-3).step()
    amp.save_pruned(model, "pruned/")

The pipeline (what `amp run RECIPE` does): `amp.run(amp.load_recipe("demo_digits"))`.
Extension points are registries: `register_adapter`, `register_mlp_kind`,
`register_builder`, `register_converter`, `register_criterion`, `register_measure`,
`register_source`, `register_task`.
"""

from . import families  # noqa: F401  (registers the timm and open_clip families)
from .config import Recipe
from .core.adapter import (
    Adapter,
    UnsupportedModel,
    get_adapter,
    list_adapters,
    register_adapter,
    register_unsupported,
    vision_tower,
)
from .core.criterion import (
    clip_entropy_loss,
    criterion_info,
    entropy_loss,
    list_criteria,
    make_criterion,
    one_hot_loss,
    register_criterion,
)
from .core.importance import AMPImportance
from .core.mlp import (
    FusedMLPView,
    MLPView,
    find_mlps,
    list_mlp_kinds,
    register_mlp_kind,
    register_not_mlp,
)
from .core.models import (
    ModelSpec,
    build_model,
    create_model,
    list_builders,
    list_converters,
    register_builder,
    register_converter,
)
from .core.serialization import load_pruned, save_pruned
from .core.tp import (
    PackedGateLinear,
    PackedGatePruner,
    build_dependency_graph,
    customized_pruners,
    mark_packed_gates,
    prune_mlps,
)
from .data import list_sources, register_source
from .evaluate import list_tasks, register_task
from .run import RecipeError, Run, RunDir, load_recipe, plan, run
from .search.allocation import GlobalAllocation
from .search.greedy import PruneResult, Trial
from .search.measures import SearchMeasure, list_measures, register_measure
from .search.pruner import AMPPruner

prepare = mark_packed_gates  # the one step a Torch-Pruning script adds before its pruner

__all__ = [
    "AMPImportance", "AMPPruner", "Adapter", "FusedMLPView", "GlobalAllocation", "MLPView",
    "ModelSpec",
    "PackedGateLinear", "PackedGatePruner", "PruneResult", "Recipe", "RecipeError", "Run",
    "RunDir", "Trial", "build_dependency_graph", "build_model", "clip_entropy_loss",
    "create_model", "criterion_info", "customized_pruners", "entropy_loss", "find_mlps",
    "get_adapter", "list_adapters", "list_builders", "list_converters", "list_criteria",
    "list_measures", "list_mlp_kinds", "list_sources", "list_tasks", "load_pruned",
    "load_recipe", "make_criterion", "mark_packed_gates", "one_hot_loss", "plan", "prepare",
    "prune_mlps", "register_adapter", "register_builder", "register_converter",
    "register_criterion", "register_measure", "register_mlp_kind", "register_not_mlp",
    "register_source", "register_task", "register_unsupported", "run", "save_pruned",
    "SearchMeasure", "UnsupportedModel", "vision_tower",
]
__version__ = "0.1.0"
