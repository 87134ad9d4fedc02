"""Features of the labelled splits (train / test of the data source), per model, and the
original model's features that the fixed-side tasks compare every model with.

The original's features are what a user keeps frozen when a pruned model replaces the
original (a vector index, class prototypes, a classifier head built from it). They are
computed once per run and cached in a safetensors file (`EvalContext.reference`, an
`OriginalFeatures`, says where); the "teacher" role is the original, so its label tasks
read the same features.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..utils.io import atomic_write, fingerprint
from .base import EvalContext, EvalTask, OriginalFeatures
from .extract import extract_features

__all__ = ["ORIGINAL", "FixedSideTask", "LabelTask", "LabelledFeatures", "OriginalFeatures",
           "check_same_space", "labelled_splits", "model_features", "original_features"]

ORIGINAL = "teacher"  # the role that names the original model
_TENSORS = ("train", "train_labels", "test", "test_labels")


@dataclass(frozen=True)
class LabelledFeatures:
    """One model's features of the labelled train and test images, with their labels."""

    train: torch.Tensor
    train_labels: torch.Tensor
    test: torch.Tensor
    test_labels: torch.Tensor

    def as_tuple(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.train, self.train_labels, self.test, self.test_labels


def labelled_splits(cfg, ctx: EvalContext) -> dict:
    """The source's labelled {"train", "test"} splits, once per evaluation."""
    return ctx.once("labelled_splits", lambda: ctx.source.labelled_splits(
        ctx.data, ctx.seed, max_train=cfg.max_train))


def _extract(model: nn.Module, role: str, cfg, ctx: EvalContext) -> LabelledFeatures:
    splits = labelled_splits(cfg, ctx)
    feats = {s: extract_features(model, splits[s].images, cfg.batch_size,
                                 description=f"{role}: {s} features",
                                 show_progress=ctx.show_progress) for s in ("train", "test")}
    return LabelledFeatures(feats["train"], splits["train"].labels, feats["test"],
                            splits["test"].labels)


def model_features(model: nn.Module, role: str, cfg, ctx: EvalContext) -> LabelledFeatures:
    """`model`'s labelled features, once per role; the original's come from its cache."""
    if role == ORIGINAL:
        return original_features(cfg, ctx, model)
    return ctx.once(("features", role, id(model)), lambda: _extract(model, role, cfg, ctx))


def _cache_key(cfg, ctx: EvalContext) -> str:
    ref = ctx.reference
    return fingerprint(ref.identity if ref else "", ctx.data, ctx.seed, cfg.max_train)


def _read_cache(path: Path | None, key: str) -> LabelledFeatures | None:
    from safetensors import safe_open

    if path is None or not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("fingerprint") != key or set(f.keys()) != set(_TENSORS):
            return None
        return LabelledFeatures(*(f.get_tensor(k) for k in _TENSORS))


def _write_cache(path: Path, key: str, feats: LabelledFeatures) -> None:
    from safetensors.torch import save

    tensors = {k: getattr(feats, k).contiguous() for k in _TENSORS}
    atomic_write(path, save(tensors, metadata={"fingerprint": key}))


def original_features(cfg, ctx: EvalContext, model: nn.Module | None = None) -> LabelledFeatures:
    """The original model's labelled features, once per evaluation: read from
    `ctx.reference.cache` when it holds them for this original and these splits, else
    extracted from `model` (the original, evaluated as the "teacher" role) or from
    `ctx.reference.load()`, and written to the cache."""

    def make() -> LabelledFeatures:
        ref, key = ctx.reference, _cache_key(cfg, ctx)
        cache = ref.cache if ref else None
        cached = _read_cache(cache, key)
        if cached is not None:
            ctx.log(f"original features: read from {cache}")
            return cached
        original = model
        if original is None:
            if ref is None or ref.load is None:
                raise ValueError("the original model's features are needed: evaluate the "
                                 f"original (role {ORIGINAL!r}) first, or give the "
                                 "evaluation context a reference to load it")
            original = ref.load().to(ctx.device).float().eval()
        feats = _extract(original, ORIGINAL, cfg, ctx)
        if cache is not None:
            _write_cache(cache, key, feats)
            ctx.log(f"original features: computed, cached in {cache}")
        return feats

    return ctx.once("original_features", make)


# ---- task bases ----------------------------------------------------------------------------
class LabelTask(EvalTask):
    """A task on the labelled splits' features."""

    needs_labels = True

    def check(self, cfg, ctx, model):
        if "labels" not in ctx.source.gives:
            raise ValueError(f"eval task {self.name} needs labelled images: data.kind "
                             f"{ctx.data.kind!r} gives none (use digits or imagefolder with "
                             "data.val_root)")

    def features(self, model: nn.Module, role: str, cfg, ctx: EvalContext):
        """(train features, train labels, test features, test labels), once per role."""
        return model_features(model, role, cfg, ctx).as_tuple()


class FixedSideTask(LabelTask):
    """A task that compares a model's features with the original's, kept fixed (what a
    user keeps when the pruned model replaces the original): `score(original, evaluated)`."""

    order = 21

    def check(self, cfg, ctx, model):
        super().check(cfg, ctx, model)
        ref = ctx.reference
        has_original = ORIGINAL in ctx.roles or (ref is not None and (
            ref.load is not None or (ref.cache is not None and ref.cache.is_file())))
        if not has_original:
            raise ValueError(f"eval task {self.name} compares with the original model: "
                             f"evaluate it (role {ORIGINAL!r}) or give the evaluation "
                             "context a reference to load it")

    def score(self, original: LabelledFeatures, evaluated: LabelledFeatures, cfg) -> float:
        raise NotImplementedError

    def run(self, model, role, cfg, ctx):
        evaluated = model_features(model, role, cfg, ctx)
        original = original_features(cfg, ctx, model if role == ORIGINAL else None)
        value = self.score(original, evaluated, cfg)
        ctx.log(f"{role}: {self.name} {value:.4g}")
        return value


def check_same_space(original: torch.Tensor, evaluated: torch.Tensor, what: str,
                     paired: bool = False) -> None:
    """Refuse features that cannot be compared in one space (and, `paired`, row by row:
    one row per test image on each side)."""
    if original.dim() != 2 or evaluated.dim() != 2:
        raise ValueError(f"{what}: expected (N, D) features, got {tuple(original.shape)} "
                         f"and {tuple(evaluated.shape)}")
    if original.shape[1] != evaluated.shape[1]:
        raise ValueError(f"{what}: the original's features have {original.shape[1]} "
                         f"dimensions, the evaluated model's {evaluated.shape[1]}")
    if paired and len(original) != len(evaluated):
        raise ValueError(f"{what}: {len(original)} original and {len(evaluated)} "
                         "evaluated embeddings (one per test image each)")
