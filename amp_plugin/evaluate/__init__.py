"""Evaluation of the original, pruned and distilled vision encoders, on local data only.

Registered tasks (one module each, `@register_task`): knn, linear_probe (features.py);
against the original model's features, kept fixed: prototype, original_knn,
identification, cosine_to_original (one module each, the original's features cached by
labelled.py); zeroshot_classification, zeroshot_retrieval (zero_shot.py), throughput
(throughput.py). A new task is one module here plus one import line below.
"""

from . import (  # noqa: F401  (registration)
    cosine,
    features,
    identification,
    original_knn,
    prototype,
    throughput,
    zero_shot,
)
from .base import (
    EvalContext,
    EvalTask,
    OriginalFeatures,
    Row,
    get_task,
    list_tasks,
    register_task,
    resolved_tasks,
)
from .cosine import cosine_to_original
from .extract import extract_features
from .features import knn_top1, linear_probe
from .identification import identification_rate
from .labelled import LabelledFeatures, original_features
from .original_knn import original_knn_top1
from .prototype import prototype_accuracy
from .runner import check_tasks, evaluate_models
from .throughput import compare_throughput, measure_throughput
from .zero_shot import (
    classification_dataset,
    clip_transform,
    load_classifier,
    retrieval_dataset,
    text_classifier,
    zero_shot_classification,
    zero_shot_retrieval,
)

__all__ = ["EvalContext", "EvalTask", "LabelledFeatures", "OriginalFeatures", "Row",
           "check_tasks", "classification_dataset", "clip_transform", "compare_throughput",
           "cosine_to_original",
           "evaluate_models", "extract_features", "get_task", "identification_rate",
           "knn_top1", "linear_probe", "list_tasks", "load_classifier", "measure_throughput",
           "original_features", "original_knn_top1", "prototype_accuracy", "register_task",
           "resolved_tasks", "retrieval_dataset", "text_classifier",
           "zero_shot_classification", "zero_shot_retrieval"]
