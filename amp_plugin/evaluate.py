"""Evaluation of the original, pruned and distilled vision encoders, on local data only.

    extract_features            the pooled features AMP measures (ALGORITHM.md section 4)
    knn_top1                    DINO's weighted kNN (cosine, exp(sim / T) votes), top-1 %
    linear_probe                scikit-learn logistic regression on L2-normalised features
    zero_shot_classification    CLIP zero-shot top-1/top-5 with a cached text classifier
    zero_shot_retrieval         image<->text recall@1/5/10 on COCO / Flickr style data
    evaluate_run                all configured tasks for every model of a run directory

Zero-shot metrics come from clip-benchmark (the library the reference vendored); the
text classifier is cached in a safetensors file because AMP prunes only the vision
tower: the original, pruned and distilled models share the text tower, so one
classifier serves all three (the reference's save_clf / load_clf).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from .adapters import vision_tower
from .atomic import atomic_write
from .progress import progress

if TYPE_CHECKING:
    from .recipe import Recipe

TASKS = ("knn", "linear_probe", "zeroshot_classification", "zeroshot_retrieval", "throughput")
Task = Literal["knn", "linear_probe", "zeroshot_classification", "zeroshot_retrieval",
               "throughput"]
# clip-benchmark datasets that read an existing local folder and never download when it
# is there (imagenetv2 downloads unless complete; checked before it is built).
CLIP_BENCHMARK_DATASETS = ("imagenet1k", "imagenetv2", "imagenet-a", "imagenet-r",
                           "imagenet-o", "imagenet_sketch", "objectnet")
MODEL_ROLES = ("teacher", "pruned", "distilled")
EVAL_JSON = "eval.json"


# ---- recipe section ------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _is_file_ref(value: str) -> bool:
    return value.endswith((".json", ".txt")) or os.sep in value


def _clip_benchmark_json(name: str) -> dict:
    import clip_benchmark.datasets as cbd

    return json.loads((Path(cbd.__file__).parent / name).read_text())


class ZeroShotDataset(_Strict):
    """One zero-shot classification set: an ImageNet-style folder (or a clip-benchmark
    dataset read from a local folder), its class names and prompt templates."""

    name: str = Field(description="label in the report, e.g. imagenet1k")
    dataset: str = Field(default="imagefolder",
                         description="imagefolder or one of " + ", ".join(CLIP_BENCHMARK_DATASETS))
    root: str = Field(description="local image folder")
    classnames: list[str] | str | None = Field(
        default=None, description="list, .json/.txt file, or a clip-benchmark key (imagenet1k); "
                                  "default: the dataset's own, else the folder names")
    templates: list[str] | dict[str, list[str]] | str | None = Field(
        default=None, description="prompts with {c}: list, .json/.txt file, or a clip-benchmark "
                                  "key; default: the dataset's own, else imagenet1k's")
    classifier_cache: str | None = Field(
        default=None, description="text classifier file (default: RUN_DIR/classifiers/NAME)")

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v):
        if v != "imagefolder" and v not in CLIP_BENCHMARK_DATASETS:
            raise ValueError(f"expected imagefolder or one of {list(CLIP_BENCHMARK_DATASETS)}")
        return v

    @field_validator("classnames", "templates")
    @classmethod
    def _known_key(cls, v, info):
        if isinstance(v, str) and not _is_file_ref(v):
            source = ("en_classnames.json" if info.field_name == "classnames"
                      else "en_zeroshot_classification_templates.json")
            if v not in _clip_benchmark_json(source):
                raise ValueError(f"{v!r} is neither a .json/.txt file nor a clip-benchmark "
                                 f"{info.field_name} key (e.g. imagenet1k)")
        return v


class RetrievalDataset(_Strict):
    """Image folder plus captions: COCO captions JSON or a Flickr30k Karpathy txt file."""

    name: str = Field(description="label in the report, e.g. coco")
    format: Literal["coco", "flickr"] = "coco"
    root: str = Field(description="folder the captions file's image names are relative to")
    captions: str = Field(description="COCO captions JSON (coco) or image,caption txt (flickr)")


class ThroughputConfig(_Strict):
    batch_size: int = Field(default=64, gt=0)
    image_size: int | None = Field(default=None, gt=0, description="default: data.image_size")
    dtype: Literal["float32", "bf16", "fp16"] = "float32"
    device: str = Field(default="auto", description="auto: cuda if available, else cpu")
    warmup: int = Field(default=3, ge=0)
    runs: int = Field(default=10, gt=0)


class EvalConfig(_Strict):
    """The `eval:` section of a recipe."""

    tasks: list[Task] | None = Field(
        default=None, description="default: knn, linear_probe, throughput, plus the zero-shot "
                                  "tasks whose datasets are listed")
    device: str = Field(default="auto", description="auto: cuda if available, else cpu")
    batch_size: int = Field(default=64, gt=0)
    workers: int = Field(default=2, ge=0, description="data loader workers (zero-shot sets)")
    amp: bool = Field(default=False, description="autocast the zero-shot evaluations")
    knn_k: int = Field(default=20, gt=0)
    knn_temperature: float = Field(default=0.07, gt=0)
    max_train: int | None = Field(default=None, gt=0, description="cap on kNN/probe train images")
    linear_probe_c: float = Field(default=1.0, gt=0, description="inverse L2 strength")
    zeroshot_classification: list[ZeroShotDataset] = Field(default_factory=list)
    zeroshot_retrieval: list[RetrievalDataset] = Field(default_factory=list)
    throughput: ThroughputConfig = Field(default_factory=ThroughputConfig)

    @model_validator(mode="after")
    def _datasets_for_tasks(self):
        for task in ("zeroshot_classification", "zeroshot_retrieval"):
            names = [d.name for d in getattr(self, task)]
            if len(set(names)) != len(names):
                raise ValueError(f"{task}: dataset names must be unique, got {names}")
            if self.tasks and task in self.tasks and not names:
                raise ValueError(f"task {task} needs at least one dataset in eval.{task}")
        return self

    def resolved_tasks(self) -> list[str]:
        if self.tasks is not None:
            return list(self.tasks)
        out = ["knn", "linear_probe"]
        out += [t for t in ("zeroshot_classification", "zeroshot_retrieval") if getattr(self, t)]
        return out + ["throughput"]

    def required_paths(self) -> dict[str, str]:
        """{key path: filesystem path} of the inputs this section names."""
        paths = {}
        for i, d in enumerate(self.zeroshot_classification):
            paths[f"eval.zeroshot_classification.{i}.root"] = d.root
            for key in ("classnames", "templates"):
                value = getattr(d, key)
                if isinstance(value, str) and _is_file_ref(value):
                    paths[f"eval.zeroshot_classification.{i}.{key}"] = value
        for i, d in enumerate(self.zeroshot_retrieval):
            paths[f"eval.zeroshot_retrieval.{i}.root"] = d.root
            paths[f"eval.zeroshot_retrieval.{i}.captions"] = d.captions
        return paths


# ---- features, kNN, linear probe -----------------------------------------------------------
def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _image_batches(images_or_loader, batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(images_or_loader, torch.Tensor):
        return [images_or_loader[i:i + batch_size]
                for i in range(0, len(images_or_loader), batch_size)]
    return images_or_loader


@torch.no_grad()
def extract_features(model: nn.Module, images_or_loader: torch.Tensor | Iterable,
                     batch_size: int = 256, feature_fn: Callable | None = None,
                     description: str = "features", show_progress: bool = True) -> torch.Tensor:
    """Pooled features (float32, on the CPU) of a (N, 3, H, W) tensor or of a loader of
    image batches / (images, labels) pairs, in order.

    Default features: `adapter.features` of the vision tower, i.e. what the AMP criterion
    measures; `feature_fn(model, images)` replaces it.
    """
    was_training = model.training
    model.eval()
    device = _device_of(model)
    dtype = next(model.parameters()).dtype
    tower, adapter = vision_tower(model)
    out = []
    try:
        for batch in progress(_image_batches(images_or_loader, batch_size), description,
                              enabled=show_progress):
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            images = images.to(device, dtype)
            feats = feature_fn(model, images) if feature_fn else adapter.features(tower, images)
            out.append(feats.float().cpu())
    finally:
        model.train(was_training)
    if not out:
        raise ValueError("extract_features: no images")
    return torch.cat(out)


@torch.no_grad()
def knn_top1(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
             test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07,
             chunk: int = 1024) -> float:
    """Weighted kNN top-1 accuracy in % (DINO, Caron et al. 2021, eval_knn.py).

    Cosine similarity to the k nearest training features; each neighbour votes for its
    class with weight exp(sim / temperature). scikit-learn's KNeighborsClassifier gives
    the same vote on the CPU only; this runs on the features' device in chunks.
    """
    if len(train_feats) != len(train_labels) or len(test_feats) != len(test_labels):
        raise ValueError("features and labels differ in length")
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1).to(train.device)
    train_labels = train_labels.long().to(train.device)
    test_labels = test_labels.long().to(train.device)
    k = min(k, len(train))
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    correct = 0
    for start in range(0, len(test), chunk):
        sim = test[start:start + chunk] @ train.T
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes, device=sim.device)
        votes.scatter_add_(1, train_labels[top_idx], (top_sim / temperature).exp())
        correct += int((votes.argmax(dim=1) == test_labels[start:start + chunk]).sum())
    return 100.0 * correct / len(test)


def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, c: float = 1.0, max_iter: int = 1000,
                 seed: int = 0) -> float:
    """Test accuracy in % of a logistic regression fitted on L2-normalised features."""
    from sklearn.linear_model import LogisticRegression

    def prep(x):
        return F.normalize(x.float(), dim=1).cpu().numpy()

    clf = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    clf.fit(prep(train_feats), train_labels.cpu().numpy())
    return 100.0 * float(clf.score(prep(test_feats), test_labels.cpu().numpy()))


# ---- zero-shot -----------------------------------------------------------------------------
def _text_fingerprint(model: nn.Module) -> str:
    """Cheap identity of the text side (everything outside the vision tower): a cached
    classifier is only reused for the same text tower."""
    tower, _ = vision_tower(model)
    vision = {id(p) for p in tower.parameters()}
    count, total = 0, 0.0
    for p in model.parameters():
        if id(p) not in vision:
            count += p.numel()
            total += float(p.detach().double().abs().sum())
    return f"{count}:{total:.10e}"


def _classifier_meta(model: nn.Module, classnames: Sequence[str], templates) -> dict[str, str]:
    return {"classnames": json.dumps(list(classnames)), "templates": json.dumps(templates),
            "text_tower": _text_fingerprint(model)}


def load_classifier(path: str | Path, meta: dict[str, str] | None = None) -> torch.Tensor | None:
    """The cached (dim, classes) classifier at `path`, or None if it is missing or was
    built for other class names, templates or text tower."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        stored = f.metadata() or {}
        if meta is not None and any(stored.get(k) != v for k, v in meta.items()):
            return None
        return f.get_tensor("classifier")


def save_classifier(path: str | Path, classifier: torch.Tensor, meta: dict[str, str]) -> Path:
    from safetensors.torch import save

    tensors = {"classifier": classifier.detach().float().cpu().contiguous()}
    return atomic_write(path, save(tensors, metadata=meta))


def _autocast_device(model: nn.Module) -> str:
    # clip-benchmark passes `device` to both .to() and torch.autocast, which takes a type.
    return _device_of(model).type


def text_classifier(model: nn.Module, tokenizer, classnames: Sequence[str], templates,
                    cache_path: str | Path | None = None, amp: bool = False) -> torch.Tensor:
    """(dim, classes) zero-shot weights: loaded from `cache_path` when it holds the
    classifier of these class names, templates and text tower, else built by
    clip-benchmark's zero_shot_classifier and written there."""
    from clip_benchmark.metrics.zeroshot_classification import zero_shot_classifier

    meta = _classifier_meta(model, classnames, templates)
    if cache_path is not None:
        cached = load_classifier(cache_path, meta)
        if cached is not None:
            return cached.to(_device_of(model))
    was_training = model.training
    model.eval()
    try:
        clf = zero_shot_classifier(model, tokenizer, list(classnames), templates,
                                   _autocast_device(model), amp=amp)
    finally:
        model.train(was_training)
    if cache_path is not None:
        save_classifier(cache_path, clf, meta)
    return clf


def zero_shot_classification(model: nn.Module, tokenizer, loader, classnames: Sequence[str],
                             templates, classifier: torch.Tensor | None = None,
                             cache_path: str | Path | None = None,
                             amp: bool = False) -> dict[str, float | None]:
    """Top-1 / top-5 accuracy and mean per-class recall, in %, of a CLIP model on a
    loader of (images, labels); top5 is None with fewer than 5 classes."""
    from clip_benchmark.metrics.zeroshot_classification import run_classification
    from sklearn.metrics import balanced_accuracy_score

    if classifier is None:
        classifier = text_classifier(model, tokenizer, classnames, templates, cache_path, amp)
    if classifier.shape[1] != len(classnames):
        raise ValueError(f"classifier has {classifier.shape[1]} classes, "
                         f"classnames has {len(classnames)}")
    was_training = model.training
    model.eval()
    try:
        logits, target = run_classification(model, classifier.to(_device_of(model)), loader,
                                            _autocast_device(model), amp=amp)
    finally:
        model.train(was_training)
    # clip-benchmark 1.6.2's accuracy() calls float() on a 1-element array, which NumPy 2.3
    # rejects; the top-k count is one line of torch.
    top = logits.topk(min(5, len(classnames)), dim=1).indices
    hit = top == target[:, None]
    recall = balanced_accuracy_score(target.numpy(), logits.argmax(dim=1).numpy())
    return {"top1": 100.0 * float(hit[:, 0].float().mean()),
            "top5": 100.0 * float(hit.any(dim=1).float().mean()) if len(classnames) >= 5
            else None,
            "mean_per_class_recall": 100.0 * float(recall)}


def zero_shot_retrieval(model: nn.Module, tokenizer, loader, recall_k: Sequence[int] = (1, 5, 10),
                        amp: bool = False) -> dict[str, float]:
    """Recall@k in % on a loader of (images, list of captions per image), as
    clip-benchmark computes it: `image_retrieval_recall@k` ranks images for each caption,
    `text_retrieval_recall@k` ranks captions for each image (hit if any caption of it)."""
    from clip_benchmark.metrics.zeroshot_retrieval import evaluate

    was_training = model.training
    model.eval()
    try:
        out = evaluate(model, loader, tokenizer, _autocast_device(model), amp=amp,
                       recall_k_list=list(recall_k))
    finally:
        model.train(was_training)
    return {k: 100.0 * v for k, v in out.items()}


# ---- datasets for the zero-shot tasks ------------------------------------------------------
def clip_transform(model: nn.Module):
    """The open_clip evaluation transform of `model` (resize, crop, normalise)."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**open_clip.get_model_preprocess_cfg(model)),
                              is_train=False)


def _read_list(path: str, key: str | None) -> list | dict:
    p = Path(path)
    if p.suffix == ".txt":
        return [line.strip() for line in p.read_text().splitlines() if line.strip()]
    data = json.loads(p.read_text())
    if isinstance(data, dict) and key in data:  # clip-benchmark's {dataset: [...]} layout
        data = data[key]
    if not isinstance(data, (list, dict)):
        raise ValueError(f"{path}: expected a list (or {{dataset: list}}), got "
                         f"{type(data).__name__}")
    return data


def _resolve_text(value, which: str, dataset_key: str, default):
    if value is None:
        return default
    if isinstance(value, (list, dict)):
        return value
    if _is_file_ref(value):
        return _read_list(value, dataset_key)
    source = "en_classnames.json" if which == "classnames" else \
        "en_zeroshot_classification_templates.json"
    return _clip_benchmark_json(source)[value]


def classification_dataset(cfg: ZeroShotDataset, transform):
    """(dataset, classnames, templates) of a zero-shot set, read from its local folder."""
    if cfg.dataset == "imagefolder":
        from torchvision.datasets import ImageFolder

        ds = ImageFolder(cfg.root, transform=transform)
        own_classes, own_templates = ds.classes, None
    else:
        if cfg.dataset == "imagenetv2":
            from clip_benchmark.datasets.imagenetv2 import V2_DATASET_SIZE

            folder = Path(cfg.root) / "ImageNetV2-matched-frequency"
            if not folder.is_dir() or sum(1 for _ in folder.glob("*/*")) != V2_DATASET_SIZE:
                raise FileNotFoundError(f"{folder}: expected the {V2_DATASET_SIZE} images of "
                                        "ImageNetV2 matched-frequency (nothing is downloaded)")
        from clip_benchmark.datasets.builder import build_dataset

        ds = build_dataset(cfg.dataset, root=cfg.root, transform=transform, split="test",
                           download=False, task="zeroshot_classification")
        own_classes, own_templates = ds.classes, getattr(ds, "templates", None)
    classnames = _resolve_text(cfg.classnames, "classnames", cfg.dataset, own_classes)
    templates = _resolve_text(cfg.templates, "templates", cfg.dataset,
                              own_templates or _clip_benchmark_json(
                                  "en_zeroshot_classification_templates.json")["imagenet1k"])
    ds.classes = list(classnames)
    return ds, list(classnames), templates


def retrieval_dataset(cfg: RetrievalDataset, transform):
    if cfg.format == "coco":
        from torchvision.datasets import CocoCaptions

        return CocoCaptions(cfg.root, cfg.captions, transform=transform)
    from clip_benchmark.datasets.flickr import Flickr

    return Flickr(cfg.root, cfg.captions, transform=transform)


def captions_collate(batch):
    """(stacked images, tuple of caption lists), the batch layout of clip-benchmark."""
    from torch.utils.data import default_collate

    images, captions = zip(*batch)
    return default_collate(images), captions


# ---- running a recipe's evaluation ---------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def original_model(recipe: Recipe) -> nn.Module:
    """The unpruned model of a recipe: the demo's trained teacher when the recipe trains
    one, else the model spec with its local weights."""
    from .models import create_model
    from .serialization import load_pruned

    if recipe.train is not None:
        ckpt = Path(recipe.train.checkpoint)
        if not (ckpt / "amp.json").is_file():
            raise FileNotFoundError(f"train.checkpoint {ckpt} does not exist; run the train "
                                    "stage first")
        return load_pruned(ckpt)
    return create_model(recipe.model)


def run_models(recipe: Recipe, run_dir: str | Path) -> dict[str, Callable[[], nn.Module]]:
    """{role: loader} for the original model and the pruned / distilled ones present in
    `run_dir` (save_pruned directories)."""
    from .serialization import load_pruned

    run_dir = Path(run_dir)
    out: dict[str, Callable[[], nn.Module]] = {"teacher": lambda: original_model(recipe)}
    for role in ("pruned", "distilled"):
        if (run_dir / role / "amp.json").is_file():
            out[role] = lambda d=run_dir / role: load_pruned(d)
    return out


def _check_tasks(tasks: Sequence[str], recipe: Recipe, cfg: EvalConfig) -> None:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown eval task(s) {unknown}; known: {', '.join(TASKS)}")
    for task in ("zeroshot_classification", "zeroshot_retrieval"):
        if task in tasks:
            if recipe.model.library != "open_clip":
                raise ValueError(f"eval task {task} needs an open_clip model with a text "
                                 f"tower; model.library is {recipe.model.library!r}")
            if not getattr(cfg, task):
                raise ValueError(f"eval task {task} needs datasets in eval.{task}")
    if ("knn" in tasks or "linear_probe" in tasks) and recipe.data.kind == "coco":
        raise ValueError("eval tasks knn/linear_probe need labelled images: data.kind digits "
                         "or imagefolder (with data.val_root)")


def _merge(old: dict, new: dict) -> dict:
    out = dict(old)
    for k, v in new.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def evaluate_run(recipe: Recipe, run_dir: str | Path, tasks: Sequence[str] | None = None,
                 show_progress: bool = True, log: Callable[[str], None] | None = None) -> dict:
    """Evaluate the original, pruned and distilled models of `run_dir` on the recipe's
    tasks; the numbers are merged into RUN_DIR/eval.json (and into report.json when the
    run has one), keeping results of tasks not rerun."""
    from .cost import count_flops, count_mlp_params, count_params
    from .report import REPORT_JSON, read_json, update_report, write_json
    from .throughput import measure_throughput

    cfg = recipe.eval or EvalConfig()
    tasks = list(tasks) if tasks else cfg.resolved_tasks()
    _check_tasks(tasks, recipe, cfg)
    log = log or (lambda msg: None)
    run_dir = Path(run_dir)
    device = resolve_device(cfg.device)
    models = run_models(recipe, run_dir)
    t0 = time.perf_counter()

    splits = None
    if "knn" in tasks or "linear_probe" in tasks:
        from .data import labelled_splits

        splits = labelled_splits(recipe.data, recipe.seed, max_train=cfg.max_train)
    tokenizer = None
    if any(t.startswith("zeroshot") for t in tasks):
        import open_clip

        tokenizer = open_clip.get_tokenizer(recipe.model.name)

    size = cfg.throughput.image_size or recipe.data.image_size
    results: dict[str, Any] = {"models": {}}
    for role, load in models.items():
        model = load().to(device).float().eval()
        tower, _ = vision_tower(model)
        example = torch.zeros(1, 3, size, size, device=device)
        results["models"][role] = {"params": count_params(tower),
                                   "mlp_params": count_mlp_params(tower),
                                   "flops": count_flops(model, example)}
        if splits is not None:
            feats = {s: extract_features(model, splits[s].images, cfg.batch_size,
                                         description=f"{role}: {s} features",
                                         show_progress=show_progress)
                     for s in ("train", "test")}
            args = (feats["train"], splits["train"].labels, feats["test"], splits["test"].labels)
            if "knn" in tasks:
                acc = knn_top1(*args, k=cfg.knn_k, temperature=cfg.knn_temperature)
                results.setdefault("accuracy", {})[role] = acc
                log(f"{role}: kNN top-1 {acc:.2f}%")
            if "linear_probe" in tasks:
                acc = linear_probe(*args, c=cfg.linear_probe_c, seed=recipe.seed)
                results.setdefault("linear_probe", {})[role] = acc
                log(f"{role}: linear probe {acc:.2f}%")
        if "zeroshot_classification" in tasks:
            from torch.utils.data import DataLoader

            for d in cfg.zeroshot_classification:
                ds, classnames, templates = classification_dataset(d, clip_transform(model))
                loader = DataLoader(ds, batch_size=cfg.batch_size, num_workers=cfg.workers)
                cache = d.classifier_cache or run_dir / "classifiers" / f"{d.name}.safetensors"
                out = zero_shot_classification(model, tokenizer, loader, classnames, templates,
                                               cache_path=cache, amp=cfg.amp)
                results.setdefault("zeroshot_classification", {}).setdefault(d.name, {})[
                    role] = out
                log(f"{role}: zero-shot {d.name} top-1 {out['top1']:.2f}%")
        if "zeroshot_retrieval" in tasks:
            from torch.utils.data import DataLoader

            for d in cfg.zeroshot_retrieval:
                ds = retrieval_dataset(d, clip_transform(model))
                loader = DataLoader(ds, batch_size=cfg.batch_size, num_workers=cfg.workers,
                                    collate_fn=captions_collate)
                out = zero_shot_retrieval(model, tokenizer, loader, amp=cfg.amp)
                results.setdefault("zeroshot_retrieval", {}).setdefault(d.name, {})[role] = out
                log(f"{role}: retrieval {d.name} image R@1 "
                    f"{out['image_retrieval_recall@1']:.2f}%")
        if "throughput" in tasks:
            t = cfg.throughput
            out = measure_throughput(model, t.batch_size, size, t.dtype,
                                     resolve_device(t.device), t.warmup, t.runs,
                                     show_progress=show_progress)
            results.setdefault("throughput", {})[role] = out
            log(f"{role}: {out['images_per_s']:.1f} images/s on {out['device']}")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if "throughput" in tasks and "teacher" in results["throughput"]:
        thr, cost = results["throughput"], results["models"]
        base = thr["teacher"]["images_per_s"]
        for role in models:
            if role != "teacher":
                thr[f"{role}_gain"] = {
                    "throughput": thr[role]["images_per_s"] / base,
                    "flops": cost["teacher"]["flops"] / max(cost[role]["flops"], 1),
                }
    results["eval_seconds"] = time.perf_counter() - t0

    merged = _merge(read_json(run_dir / EVAL_JSON) or {}, results)
    merged["tasks"] = sorted(set(merged.get("tasks", [])) | set(tasks), key=TASKS.index)
    write_json(run_dir / EVAL_JSON, merged)
    if (run_dir / REPORT_JSON).is_file():
        update_report(run_dir, eval_section(merged))
    return merged


def eval_section(ev: dict) -> dict:
    """The part of a report that comes from eval.json."""
    keys = ("accuracy", "linear_probe", "zeroshot_classification", "zeroshot_retrieval",
            "throughput")
    return {k: ev[k] for k in keys if k in ev}

