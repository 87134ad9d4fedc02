"""Recipes: YAML files validated against a schema before any work starts.

An unknown key, a wrong type or a missing field is reported with its key path and what
was expected; every file or folder a recipe names must exist (a placeholder path is
reported by name). Nothing is written to the run directory until the recipe is valid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from .distill import DistillConfig
from .evaluate import EvalConfig
from .models import ModelSpec

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
DEFAULT_RECIPE = "demo_digits"


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the file and the key path."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(Strict):
    kind: Literal["digits", "imagefolder", "coco"] = "digits"
    root: str | None = Field(default=None, description="train folder / image folder")
    val_root: str | None = Field(default=None, description="validation/test folder")
    captions: str | None = Field(default=None, description="COCO captions JSON (kind: coco)")
    image_size: int = Field(default=224, gt=0)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    calib_images: int = Field(default=1024, gt=0, description="images used for scoring")
    val_images: int = Field(default=1024, gt=0, description="images of the entropy test")
    batch_size: int = Field(default=128, gt=0, description="calibration/validation batch")
    workers: int = Field(default=4, ge=0)
    test_fraction: float = Field(default=0.25, gt=0, lt=1, description="digits: test split")


class CacheConfig(Strict):
    device_gib: float = Field(default=2.0, ge=0, description="states kept on the device up to")
    host_gib: float = Field(default=8.0, ge=0, description="then in host memory up to")
    dir: str | None = Field(default=None, description="then on disk here (default: tmp)")


class AMPConfig(Strict):
    criterion: Literal["entropy", "clip_entropy", "one_hot"] = "entropy"
    inv_temperature: float = Field(default=20.0, gt=0)
    threshold: float = Field(default=5e-3, ge=0, description="allowed entropy rise (Delta E)")
    max_steps: int = Field(default=6, ge=1)
    round_to: int | None = Field(default=None, ge=1)
    use_abs: bool = True
    grad_checkpointing: bool = False
    dtype: Literal["float32", "bf16", "fp16"] = "float32"
    device: str = "auto"
    cache: CacheConfig = Field(default_factory=CacheConfig)


class TeacherTraining(Strict):
    """Demo only: train the teacher with a SimCLR objective (no labels) and cache it."""

    epochs: int = Field(default=60, gt=0)
    batch_size: int = Field(default=128, gt=1)
    lr: float = Field(default=1e-3, gt=0)
    temperature: float = Field(default=0.1, gt=0)
    checkpoint: str = Field(description="where the trained teacher is cached")


STAGES = ("train", "score", "prune", "distill", "eval", "report")


class Recipe(Strict):
    name: str
    seed: int = 0
    output_dir: str = Field(description="run directory (created when the run starts)")
    stages: list[Literal["train", "score", "prune", "distill", "eval", "report"]] = Field(
        default_factory=lambda: ["score", "prune", "eval", "report"])
    model: ModelSpec
    data: DataConfig = Field(default_factory=DataConfig)
    amp: AMPConfig = Field(default_factory=AMPConfig)
    train: TeacherTraining | None = None
    distill: DistillConfig | None = None
    eval: EvalConfig | None = None
    _source: Path | None = PrivateAttr(default=None)

    @field_validator("stages")
    @classmethod
    def _ordered(cls, v):
        if sorted(v, key=STAGES.index) != v or len(set(v)) != len(v):
            raise ValueError(f"stages must be a subset of {list(STAGES)} in that order")
        return v

    # ---- paths --------------------------------------------------------------------------
    def required_paths(self) -> dict[str, str]:
        """{key path: filesystem path} of every input the recipe names."""
        paths = {}
        if self.model.weights and "train" not in self.stages:
            paths["model.weights"] = self.model.weights
        if self.data.kind != "digits":
            for key in ("root", "val_root", "captions"):
                value = getattr(self.data, key)
                if value:
                    paths[f"data.{key}"] = value
        if self.distill is not None and "distill" in self.stages:
            for key in ("teacher", "student", "root"):
                value = getattr(self.distill, key)
                if value:
                    paths[f"distill.{key}"] = value
        if self.eval is not None:
            paths.update(self.eval.required_paths())
        return paths


def _key_path(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "<root>"


def resolve_recipe_path(recipe: str | Path | None) -> Path:
    """A path, or the name of a recipe shipped in recipes/ (default: the demo)."""
    if recipe is None:
        recipe = DEFAULT_RECIPE
    p = Path(recipe)
    if p.is_file():
        return p
    shipped = RECIPES_DIR / f"{p.stem}.yaml"
    if p.suffix in ("", ".yaml") and shipped.is_file() and not p.parent.parts:
        return shipped
    raise RecipeError(f"recipe file not found: {recipe}")


def load_recipe(recipe: str | Path | None = None, overrides: dict | None = None,
                check_paths: bool = True) -> Recipe:
    """Read and validate a recipe; raises RecipeError naming the file and key path."""
    path = resolve_recipe_path(recipe)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        parsed = Recipe.model_validate(raw)
    except ValidationError as e:
        lines = [f"{path}: invalid recipe"]
        for err in e.errors():
            lines.append(f"  {_key_path(err['loc'])}: {err['msg']}"
                         + (f" (got {err['input']!r})" if err["type"] != "missing" else ""))
        raise RecipeError("\n".join(lines)) from None
    if check_paths:
        missing = {k: v for k, v in parsed.required_paths().items() if not Path(v).exists()}
        if missing:
            raise RecipeError(f"{path}: missing files or folders:\n" + "\n".join(
                f"  {k}: {v} does not exist" for k, v in missing.items()))
    parsed._source = path
    return parsed
