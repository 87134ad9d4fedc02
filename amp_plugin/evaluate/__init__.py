"""Evaluation of the original, pruned and distilled vision encoders, on local data only.

Registered tasks (one module each, `@register_task`): knn, linear_probe (features.py),
zeroshot_classification, zeroshot_retrieval (zero_shot.py), throughput (throughput.py).
A new task is one module here plus one import line below.
"""

from . import features, throughput, zero_shot  # noqa: F401  (registration, in this order)
from .base import (
    EvalContext,
    EvalTask,
    Row,
    get_task,
    list_tasks,
    register_task,
    resolved_tasks,
)
from .features import extract_features, knn_top1, linear_probe
from .runner import evaluate_models
from .throughput import measure_throughput
from .zero_shot import (
    classification_dataset,
    clip_transform,
    load_classifier,
    retrieval_dataset,
    text_classifier,
    zero_shot_classification,
    zero_shot_retrieval,
)

__all__ = ["EvalContext", "EvalTask", "Row", "classification_dataset", "clip_transform",
           "evaluate_models", "extract_features", "get_task", "knn_top1", "linear_probe",
           "list_tasks", "load_classifier", "measure_throughput", "register_task",
           "resolved_tasks", "retrieval_dataset", "text_classifier",
           "zero_shot_classification", "zero_shot_retrieval"]
