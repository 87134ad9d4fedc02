"""Zero-shot evaluation of image-text models (tasks `zeroshot_classification`,
`zeroshot_retrieval`), with clip-benchmark's metrics (the library the reference vendored).

What runs the text is the model's family's `ImageText` (`Adapter.image_text`: encoders,
tokenizer, evaluation transform): open_clip CLIP models, transformers CLIPModel and
SiglipModel alike; nothing here asks which family a model is.

The text classifier is cached in a safetensors file because AMP prunes only the vision
tower: the original, pruned and distilled models share the text tower, so one classifier
serves all three (the reference's save_clf / load_clf).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..config import RetrievalDataset, ZeroShotDataset, clip_benchmark_json, is_file_ref
from ..core.adapter import ImageText, get_adapter, vision_tower
from ..utils.io import atomic_write
from ..utils.tensors import device_of
from .base import ROLES, EvalContext, EvalTask, Row, register_task

log = logging.getLogger("amp")


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
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = f.metadata() or {}
            if meta is not None and any(stored.get(k) != v for k, v in meta.items()):
                return None
            clf = f.get_tensor("classifier")
    except Exception as e:  # a damaged cache (safetensors' own error types) is only a cache
        log.warning("%s: not a readable classifier (%s); computing it again", path, e)
        return None
    if clf.ndim != 2 or not clf.is_floating_point() or not bool(torch.isfinite(clf).all()):
        log.warning("%s: not a classifier (%s %s); computing it again", path,
                    str(clf.dtype).removeprefix("torch."), tuple(clf.shape))
        return None
    return clf


def save_classifier(path: str | Path, classifier: torch.Tensor, meta: dict[str, str]) -> Path:
    from safetensors.torch import save

    tensors = {"classifier": classifier.detach().float().cpu().contiguous()}
    return atomic_write(path, save(tensors, metadata=meta))


def image_text(model: nn.Module) -> ImageText:
    """The image-text side of `model` (TypeError for a model without a text tower)."""
    return get_adapter(model).image_text(model)


def _autocast_device(model: nn.Module) -> str:
    # clip-benchmark passes `device` to both .to() and torch.autocast, which takes a type.
    return device_of(model).type


def text_classifier(model: nn.Module, tokenizer, classnames: Sequence[str], templates,
                    cache_path: str | Path | None = None, amp: bool = False) -> torch.Tensor:
    """(dim, classes) zero-shot weights: loaded from `cache_path` when it holds the
    classifier of these class names, templates and text tower, else built by
    clip-benchmark's zero_shot_classifier and written there."""
    from clip_benchmark.metrics.zeroshot_classification import zero_shot_classifier

    meta = _classifier_meta(model, classnames, templates)
    if cache_path is not None:
        cached = load_classifier(cache_path, meta)
        if cached is not None and cached.shape[1] == len(classnames):
            return cached.to(device_of(model))
    was_training = model.training
    model.eval()
    try:
        clf = zero_shot_classifier(image_text(model), tokenizer, list(classnames), templates,
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
        logits, target = run_classification(image_text(model), classifier.to(device_of(model)),
                                            loader, _autocast_device(model), amp=amp)
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
        out = evaluate(image_text(model), loader, tokenizer, _autocast_device(model), amp=amp,
                       recall_k_list=list(recall_k))
    finally:
        model.train(was_training)
    return {k: 100.0 * v for k, v in out.items()}


# ---- datasets for the zero-shot tasks ------------------------------------------------------
def clip_transform(model: nn.Module):
    """The evaluation transform of an image-text model (its family's: resize, crop,
    normalise)."""
    return image_text(model).transform()


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
    if is_file_ref(value):
        return _read_list(value, dataset_key)
    source = "en_classnames.json" if which == "classnames" else \
        "en_zeroshot_classification_templates.json"
    return clip_benchmark_json(source)[value]


def classification_dataset(cfg: ZeroShotDataset, transform):
    """(dataset, classnames, templates) of a zero-shot set, read from its local folder."""
    if cfg.dataset == "imagefolder":
        from ..data.images import image_files

        ds = image_files(cfg.root, transform, key="eval.zeroshot_classification.root")
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
                              own_templates or clip_benchmark_json(
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


# ---- tasks ---------------------------------------------------------------------------------
FIXED_TEXT = ("zero-shot keeps the original's text tower: like prototype and identification, "
              "it judges the pruned image tower against a side that stays the original's")


class _ZeroShot(EvalTask):
    per_dataset = True
    needs_text_tower = True

    def default(self, cfg):
        return bool(getattr(cfg, self.name))

    def check(self, cfg, ctx, model):
        try:
            self.tokenizer(model, ctx)
            self.transform(model, ctx)
        except (TypeError, ValueError) as e:
            raise ValueError(f"eval task {self.name} needs an image-text model with a text "
                             f"tower and a local tokenizer (open_clip CLIP, transformers "
                             f"CLIPModel or SiglipModel), but the model is "
                             f"{type(model).__name__}: {e}") from None
        if not getattr(cfg, self.name):
            raise ValueError(f"eval task {self.name} needs datasets in eval.{self.name}")

    # the tokenizer and the image transform are the first model's (the original, checked
    # first): pruning changes neither, and a pruned model's own folder has neither
    def tokenizer(self, model: nn.Module, ctx: EvalContext):
        return ctx.once("tokenizer", lambda: image_text(model).tokenizer())

    def transform(self, model: nn.Module, ctx: EvalContext):
        return ctx.once("transform", lambda: image_text(model).transform())


@register_task
class ZeroShotClassification(_ZeroShot):
    name = "zeroshot_classification"
    order = 30

    def example(self, root):
        from ..data.digits import write_digit_images

        write_digit_images(root / "zeroshot", range(0, 100))
        return {"zeroshot_classification": [{
            "name": "digits", "root": str(root / "zeroshot"),
            "templates": ["a photo of the digit {c}.", "the number {c}."]}]}

    def run(self, model, role, cfg, ctx):
        from torch.utils.data import DataLoader

        out = {}
        for d in cfg.zeroshot_classification:
            ds, classnames, templates = classification_dataset(d, self.transform(model, ctx))
            loader = DataLoader(ds, batch_size=cfg.batch_size, num_workers=cfg.workers)
            cache = d.classifier_cache or (None if ctx.cache_dir is None
                                           else ctx.cache_dir / f"{d.name}.safetensors")
            out[d.name] = zero_shot_classification(model, self.tokenizer(model, ctx), loader,
                                                   classnames, templates, cache_path=cache,
                                                   amp=cfg.amp)
            ctx.log(f"{role}: zero-shot {d.name} top-1 {out[d.name]['top1']:.2f}%")
        return out

    def rows(self, section):
        rows = []
        for name, per_role in section.items():
            for metric in ("top1", "top5"):
                vals = {r: (per_role.get(r) or {}).get(metric) for r in ROLES}
                if any(v is not None for v in vals.values()):
                    rows.append(Row(f"zero-shot {name} {metric} (%)", vals,
                                    footnote=FIXED_TEXT))
        return rows


@register_task
class ZeroShotRetrieval(_ZeroShot):
    name = "zeroshot_retrieval"
    order = 40

    def example(self, root):
        from ..data import get_source

        data = get_source("coco").example(root / "retrieval")
        return {"zeroshot_retrieval": [{"name": "coco", "root": data["root"],
                                        "captions": data["captions"]}]}

    def run(self, model, role, cfg, ctx):
        from torch.utils.data import DataLoader

        out = {}
        for d in cfg.zeroshot_retrieval:
            ds = retrieval_dataset(d, self.transform(model, ctx))
            loader = DataLoader(ds, batch_size=cfg.batch_size, num_workers=cfg.workers,
                                collate_fn=captions_collate)
            out[d.name] = zero_shot_retrieval(model, self.tokenizer(model, ctx), loader,
                                              amp=cfg.amp)
            ctx.log(f"{role}: retrieval {d.name} image R@1 "
                    f"{out[d.name]['image_retrieval_recall@1']:.2f}%")
        return out

    def rows(self, section):
        rows = []
        for name, per_role in section.items():
            keys = next((list(v) for v in per_role.values() if isinstance(v, dict)), [])
            for metric in keys:
                label = metric.replace("_retrieval_recall@", " R@").replace("image",
                                                                            "text->image")
                label = label.replace("text R@", "image->text R@")
                rows.append(Row(f"{name} {label} (%)",
                                {r: (per_role.get(r) or {}).get(metric) for r in ROLES},
                                footnote=FIXED_TEXT))
        return rows
