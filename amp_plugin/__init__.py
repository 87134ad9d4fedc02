"""AMP: Adaptive MLP Pruning for large vision transformers, as a Torch-Pruning plugin."""

from .adapters import ADAPTERS, Adapter, get_adapter, register_adapter, vision_tower
from .criterion import clip_entropy_loss, entropy_loss, make_criterion, one_hot_loss
from .graph import PackedGatePruner, build_dependency_graph, customized_pruners, prune_mlps
from .importance import AMPImportance
from .mlp import MLP_KINDS, MLPView, PackedGateLinear, find_mlps, register_mlp_kind
from .models import ModelSpec, create_model, register_builder, register_converter
from .search import AMPPruner, PruneResult, Trial
from .serialization import load_pruned, save_pruned

__all__ = [
    "ADAPTERS", "AMPImportance", "AMPPruner", "Adapter", "MLPView", "MLP_KINDS", "ModelSpec",
    "PackedGateLinear", "PackedGatePruner", "PruneResult", "Trial", "build_dependency_graph",
    "clip_entropy_loss", "create_model", "customized_pruners", "entropy_loss", "find_mlps",
    "get_adapter", "load_pruned", "make_criterion", "one_hot_loss", "prune_mlps",
    "register_adapter", "register_builder", "register_converter", "register_mlp_kind",
    "save_pruned", "vision_tower",
]
__version__ = "0.1.0"
