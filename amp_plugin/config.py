"""Every section of a recipe, as strict pydantic models (configuration as data).

Engines take their own section plus explicit inputs; the recipe (`Recipe`) wires them.
Loading a YAML file, overrides and error messages live in `amp_plugin.run.recipe`.
An unknown key, a wrong type or a missing field is reported with its key path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .core.criterion import list_criteria
from .core.models import ModelSpec
from .search.allocation import GlobalAllocation
from .search.measures import DEFAULT_MEASURE, list_measures


def _accepts_bool(annotation: Any) -> bool:
    if annotation is bool or annotation is Any:
        return True
    return any(_accepts_bool(a) for a in get_args(annotation))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, v, info):
        # pydantic reads true/false as 1/0 for numbers; in a recipe that is always a typo
        if isinstance(v, bool) and not _accepts_bool(cls.model_fields[info.field_name].annotation):
            raise PydanticCustomError("bool_not_number", "expected a number, got a boolean")
        return v


class DataConfig(Strict):
    kind: str = Field(default="digits", description="a registered data source: digits, "
                      "imagefolder, coco")
    root: str | None = Field(default=None, description="train folder / image folder")
    val_root: str | None = Field(default=None, description="validation/test folder")
    captions: str | None = Field(default=None, description="COCO captions JSON (kind: coco)")
    image_size: int = Field(default=224, gt=0)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    calib_images: int | Literal["all"] = Field(default=1024, description=(
        "images used for scoring; all: the whole calibration pool (the authors: all of "
        "ImageNet-1k train)"))
    val_images: int | Literal["all"] = Field(default=1024, description=(
        "images of the entropy test; all: the whole val_root folder (val_from: val_root)"))
    val_from: Literal["root", "val_root"] = Field(default="root", description=(
        "where the search's validation images come from: root (disjoint from the "
        "calibration images, chosen by the seed) or val_root (the authors: ImageNet-1k val)"))
    transform: Literal["eval", "dino"] = Field(default="eval", description=(
        "calibration/validation transform: eval (resize bicubic + centre crop) or dino "
        "(DINOv2's augmentation, seeded per image so E_val is the same at every trial)"))
    dino_min_crop: float = Field(default=0.05, gt=0, le=1,
                                 description="transform dino: RandomResizedCrop scale minimum")
    batch_size: int = Field(default=128, gt=0, description="calibration/validation batch")
    workers: int = Field(default=4, ge=0)
    test_fraction: float = Field(default=0.25, gt=0, lt=1, description="digits: test split")
    split_seed: int | None = Field(default=None, description=(
        "digits: seed of the train/test split (default: train.seed when the recipe trains "
        "its teacher, so the teacher never sees the test images, else seed)"))
    skip_bad_images: bool = Field(default=False, description=(
        "imagefolder: pass over unreadable image files (counted in the log) instead of "
        "stopping at the first"))

    @field_validator("batch_size")
    @classmethod
    def _two_or_more(cls, v):
        if v < 2:
            raise PydanticCustomError(
                "batch_too_small", "at least 2: the entropy criterion compares each image with "
                "the others of its batch, so a batch of 1 has entropy 0 and every cut would pass")
        return v

    @model_validator(mode="after")
    def _one_batch_at_least(self):
        for key in ("calib_images", "val_images"):
            if getattr(self, key) != "all" and getattr(self, key) < self.batch_size:
                raise PydanticCustomError(
                    "fewer_than_a_batch", "{key} {n} is smaller than one batch (batch_size "
                    "{bs}): the entropy would be computed on no full batch",
                    {"key": key, "n": getattr(self, key), "bs": self.batch_size})
        return self

    @field_validator("calib_images", "val_images")
    @classmethod
    def _positive(cls, v):
        if v != "all" and v <= 0:
            raise ValueError("expected a positive number of images or 'all'")
        return v

    @model_validator(mode="after")
    def _val_source(self):
        if self.val_from == "val_root" and self.val_root is None:
            raise ValueError("val_from: val_root needs data.val_root")
        if self.val_images == "all" and self.val_from != "val_root":
            raise ValueError("val_images: all needs val_from: val_root (validation images "
                             "drawn from root leave the rest to calibration)")
        return self


class CacheConfig(Strict):
    device_gib: float = Field(default=2.0, ge=0, description="states kept on the device up to")
    host_gib: float = Field(default=8.0, ge=0, description="then in host memory up to")
    dir: str | None = Field(default=None, description="then on disk here (default: tmp)")
    disk_gib: float | None = Field(default=64.0, ge=0, description="up to (null: no limit); "
                                   "beyond the three, the cache is checkpointed (sqrt(L) blocks)")


class TargetConfig(Strict):
    """Budget mode: search the threshold until the pruned model keeps this much."""

    mlp_params: float | None = Field(default=None, gt=0, description=(
        "MLP parameters to keep: a fraction of the original (<= 1) or a number"))
    params: float | None = Field(default=None, gt=0, description="vision-tower parameters")
    flops: float | None = Field(default=None, gt=0, description="FLOPs per image")
    tolerance: float = Field(default=0.01, gt=0, lt=1, description="relative to the target")
    max_searches: int = Field(default=12, ge=1, description="AMP searches at most")

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("mlp_params", "params", "flops") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"exactly one of mlp_params, params, flops, got {given or 'none'}")
        return self

    def spec(self) -> dict:
        """The dict `search.budget.Target.parse` reads."""
        return self.model_dump(exclude_none=True)


def _one_of(v: str, names: list[str]) -> str:
    if v not in names:
        expected = ", ".join(repr(n) for n in names[:-1]) + f" or {names[-1]!r}"
        raise PydanticCustomError("literal_error", "Input should be {expected}",
                                  {"expected": expected})
    return v


GLOBAL_ONLY = ("grid", "coarse_points", "refine_rounds", "curve_images", "max_verifications")


class SearchConfig(Strict):
    """How the sizes are decided: the measure, and per block (greedy) or all at once."""

    measure: str = Field(default=DEFAULT_MEASURE, description=(
        "a registered search measure: entropy_rise (the authors' rule), kl, cosine"))
    allocation: Literal["greedy", "global"] = Field(default="greedy", description=(
        "greedy: binary search per block, last first (the authors'); global: every size at "
        "once from per-block distortion curves, solved exactly for amp.target (or the "
        "largest cut whose summed distortion stays <= amp.threshold)"))
    grid: int = Field(default=GlobalAllocation.grid, ge=1, description=(
        "global: curves at multiples of this (amp.round_to, when set, instead; it then "
        "also binds the final sizes)"))
    coarse_points: int = Field(default=GlobalAllocation.coarse_points, ge=1, description=(
        "global: evenly spaced points measured first on each curve"))
    refine_rounds: int = Field(default=GlobalAllocation.refine_rounds, ge=0, description=(
        "global: rounds measuring the grid points next to the chosen sizes"))
    curve_images: int | None = Field(default=None, gt=0, description=(
        "global: validation images the curves are measured on (the first whole batches; "
        "null: all); the verification uses all"))
    max_verifications: int = Field(default=GlobalAllocation.max_verifications, ge=1,
                                   description="global: joint evaluations at most")
    confidence: float | None = Field(default=None, gt=0, lt=1, description=(
        "greedy with a threshold: a trial stops reading validation batches once a "
        "sequential bound decides it at this confidence for the whole search (e.g. 0.99); "
        "null: every trial reads every batch (the authors')"))
    exact_reference: bool = Field(default=True, description=(
        "with confidence: read each block's accepted size on every batch, so E_prev and the "
        "trace are exact and an early accept the full pass refutes is searched again; "
        "false: E_prev's value on a batch is computed only when a trial reads it (fewer "
        "image forwards; the trace then holds means over the batches read, the final E_val "
        "stays exact)"))

    @field_validator("measure")
    @classmethod
    def _known_measure(cls, v):
        return _one_of(v, list_measures())

    @model_validator(mode="after")
    def _global_settings(self):
        # a value equal to its default is not a setting (a run directory's recipe.yaml
        # writes every field out)
        given = [k for k in GLOBAL_ONLY if k in self.model_fields_set
                 and getattr(self, k) != type(self).model_fields[k].default]
        if self.allocation == "greedy" and given:
            raise PydanticCustomError(
                "global_only", "{key} applies to allocation: global (allocation is greedy)",
                {"key": given[0]})
        if self.confidence is None and "exact_reference" in self.model_fields_set \
                and not self.exact_reference:
            raise PydanticCustomError(
                "needs_confidence", "exact_reference: false applies to early decisions "
                "(set confidence)")
        if self.allocation == "global" and self.confidence is not None:
            raise PydanticCustomError(
                "greedy_only", "confidence applies to allocation: greedy (allocation is global)")
        return self

    def allocation_spec(self) -> str | dict:
        """What `AMPPruner(allocation=...)` takes."""
        if self.allocation == "greedy":
            return "greedy"
        return {k: getattr(self, k) for k in GLOBAL_ONLY}


class ScoreConvergenceConfig(Strict):
    """Stop the score stage once the neurons each size the search can try would keep have
    not changed (at most a fraction `tolerance` of them) for `patience` checks in a row (one
    check every `every` batches)."""

    every: int = Field(default=50, gt=0, description="calibration batches between checks")
    patience: int = Field(default=3, gt=0, description=(
        "checks in a row without a change before the pass stops"))
    tolerance: float = Field(default=0.0, ge=0, lt=1, description=(
        "a check counts as unchanged when at most this fraction of all neurons moved"))


class AMPConfig(Strict):
    criterion: str = Field(default="entropy", description="a registered criterion")
    inv_temperature: float = Field(default=20.0, gt=0)
    threshold: float = Field(default=5e-3, ge=0, description="allowed entropy rise (Delta E)")
    max_steps: int = Field(default=6, ge=1)
    round_to: int | None = Field(default=None, ge=1)
    search_head: bool = Field(default=False, description=(
        "also search the MLP of an attention-pool head (SigLIP, PE-Core); kept whole if not"))
    use_abs: bool = True
    grad_checkpointing: bool = False
    dtype: Literal["float32", "bf16", "fp16"] = "float32"
    search_dtype: Literal["float32", "bf16", "fp16"] | None = Field(default=None, description=(
        "dtype of the model during the search's entropy evaluations (default: dtype); "
        "float32 with dtype bf16 scores in bf16 and decides sizes in float32"))
    device: str = "auto"
    cache: CacheConfig = Field(default_factory=CacheConfig)
    checkpoint_every: int = Field(default=50, gt=0, description="calibration batches between "
                                  "checkpoints of the score stage (a killed run resumes)")
    score_convergence: ScoreConvergenceConfig | None = Field(default=None, description=(
        "stop scoring early once the search's candidates stop changing (default: one whole "
        "pass, as the authors)"))
    target: TargetConfig | None = Field(default=None, description=(
        "budget mode: the threshold is searched (starting at `threshold`) to meet this; "
        "with search.allocation: global, the sizes are solved for it directly"))
    search: SearchConfig = Field(default_factory=SearchConfig)

    @model_validator(mode="after")
    def _early_needs_threshold(self):
        if self.target is not None and self.search.confidence is not None:
            raise PydanticCustomError(
                "threshold_only", "search.confidence applies to a search with a threshold, "
                "not to budget mode (amp.target is set)")
        return self

    @field_validator("criterion")
    @classmethod
    def _known_criterion(cls, v):
        return _one_of(v, list_criteria())


class TeacherTraining(Strict):
    """Demo only: train the teacher with a SimCLR objective (no labels). A teacher the train
    stage makes goes into the run directory; `checkpoint` is read, never written."""

    epochs: int = Field(default=60, gt=0)
    batch_size: int = Field(default=128, gt=1)
    lr: float = Field(default=1e-3, gt=0)
    temperature: float = Field(default=0.1, gt=0)
    seed: int = Field(default=0, description=(
        "the teacher's initialisation and augmentations (the recipe's seed draws the "
        "calibration and validation images and everything after)"))
    checkpoint: str | None = Field(default=None, description=(
        "a saved teacher (read only), used when it was trained with these settings; "
        "otherwise the train stage trains one into the run directory"))


class DistillConfig(Strict):
    """The recipe's `distill` section."""

    teacher: str | None = Field(default=None, description=(
        "save_pruned directory of the teacher (default: the train stage's teacher when the "
        "recipe trains one, else the recipe's model)"))
    student: str | None = Field(default=None, description=(
        "save_pruned directory of the student (default: <output_dir>/pruned)"))
    loss: Literal["mse", "kl_entropy"] = "mse"
    inv_temperature: float = Field(default=20.0, gt=0, description="kl_entropy only")
    root: str | None = Field(default=None, description=(
        "ImageNet-style training folder (default: the recipe's data)"))
    min_crop: float = Field(default=0.35, gt=0, le=1, description="RandomResizedCrop scale")
    augment: Literal["crop", "crop_flip", "dino"] = Field(default="crop", description=(
        "crop: RandomResizedCrop (bicubic); crop_flip: + horizontal flip (the authors' "
        "CLIP/EVA setting); dino: DINOv2's augmentation from min_crop (the authors' DINOv2)"))
    epochs: int = Field(default=5, gt=0)
    max_steps: int | None = Field(default=None, gt=0, description="cap on optimizer steps")
    batch_size: int = Field(default=64, gt=0, description="images per rank and micro-step")
    grad_accum: int = Field(default=1, gt=0)
    base_lr: float = Field(default=2e-5, gt=0, description="lr = base_lr x global batch / 256")
    min_lr: float = Field(default=1e-6, ge=0)
    warmup_epochs: float = Field(default=1.0, ge=0)
    weight_decay: tuple[float, float] = Field(default=(0.04, 0.2),
                                              description="cosine from first to second")
    decay_exempt: bool = Field(default=False, description=(
        "no weight decay on biases, norms and embeddings (timm's split); default: every "
        "parameter decays, as the authors' distillation does"))
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = Field(default=None, gt=0)
    dtype: Literal["auto", "float32", "bf16", "fp16"] = Field(
        default="auto", description="auto: bf16 on accelerators that support it, else float32")
    zero_stage: Literal[1, 2, 3] = 2
    offload_optimizer: dict[str, Any] | None = Field(default=None, description=(
        "DeepSpeed zero_optimization.offload_optimizer, passed through"))
    offload_param: dict[str, Any] | None = Field(default=None, description=(
        "DeepSpeed zero_optimization.offload_param (stage 3), passed through"))
    deepspeed: dict[str, Any] = Field(default_factory=dict, description=(
        "extra DeepSpeed config, merged last"))
    grad_checkpointing: bool = False
    checkpoint_every: int = Field(default=500, gt=0, description="optimizer steps")
    keep_checkpoints: int = Field(default=2, ge=1)
    workers: int | None = Field(default=None, ge=0, description="default: data.workers")

    @field_validator("offload_optimizer", "offload_param")
    @classmethod
    def _deepspeed_offload(cls, v, info):
        if v is None:
            return v
        # DeepSpeed's own schema for these sections, so the recipe fails before any work.
        from deepspeed.runtime.zero.offload_config import (
            DeepSpeedZeroOffloadOptimizerConfig,
            DeepSpeedZeroOffloadParamConfig,
        )

        schema = (DeepSpeedZeroOffloadOptimizerConfig if info.field_name == "offload_optimizer"
                  else DeepSpeedZeroOffloadParamConfig)
        schema(**v)
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.offload_param is not None and self.zero_stage != 3:
            raise ValueError("offload_param needs zero_stage 3")
        return self


# clip-benchmark datasets that read an existing local folder and never download when it
# is there (imagenetv2 downloads unless complete; checked before it is built).
CLIP_BENCHMARK_DATASETS = ("imagenet1k", "imagenetv2", "imagenet-a", "imagenet-r",
                           "imagenet-o", "imagenet_sketch", "objectnet")


def is_file_ref(value: str) -> bool:
    return value.endswith((".json", ".txt")) or os.sep in value


def clip_benchmark_json(name: str) -> dict:
    import clip_benchmark.datasets as cbd

    return json.loads((Path(cbd.__file__).parent / name).read_text())


class ZeroShotDataset(Strict):
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
        if isinstance(v, str) and not is_file_ref(v):
            source = ("en_classnames.json" if info.field_name == "classnames"
                      else "en_zeroshot_classification_templates.json")
            if v not in clip_benchmark_json(source):
                raise ValueError(f"{v!r} is neither a .json/.txt file nor a clip-benchmark "
                                 f"{info.field_name} key (e.g. imagenet1k)")
        return v


class RetrievalDataset(Strict):
    """Image folder plus captions: COCO captions JSON or a Flickr30k Karpathy txt file."""

    name: str = Field(description="label in the report, e.g. coco")
    format: Literal["coco", "flickr"] = "coco"
    root: str = Field(description="folder the captions file's image names are relative to")
    captions: str = Field(description="COCO captions JSON (coco) or image,caption txt (flickr)")


class ThroughputConfig(Strict):
    batch_size: int = Field(default=64, gt=0)
    image_size: int | None = Field(default=None, gt=0, description="default: data.image_size")
    dtype: Literal["float32", "bf16", "fp16"] = "float32"
    device: str = Field(default="auto", description="auto: cuda if available, else cpu")
    warmup: int = Field(default=3, ge=0)
    runs: int = Field(default=20, gt=0, description=(
        "timed runs per model, the models timed in turns (A B, B A, ...)"))
    min_run_seconds: float = Field(default=0.05, ge=0, description=(
        "a run repeats the batch until it lasts this long (short batches are timed in "
        "groups)"))
    threads: int | None = Field(default=None, gt=0, description=(
        "CPU threads while timing (default: torch's); fewer than the cores when the machine "
        "is shared"))
    compile: bool = Field(default=False, description="time the models through torch.compile")
    sdpa: bool | None = Field(default=None, description=(
        "timm models: fused scaled-dot-product attention on (true) or off (false); "
        "null: as built"))


class EvalConfig(Strict):
    """The `eval:` section of a recipe."""

    tasks: list[str] | None = Field(
        default=None, description="registered eval tasks; default: knn, linear_probe, "
                                  "prototype, original_knn, identification, cosine_to_original, "
                                  "throughput, plus the zero-shot tasks whose datasets are listed")
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

    def required_paths(self) -> dict[str, str]:
        """{key path: filesystem path} of the inputs this section names."""
        paths = {}
        for i, d in enumerate(self.zeroshot_classification):
            paths[f"eval.zeroshot_classification.{i}.root"] = d.root
            for key in ("classnames", "templates"):
                value = getattr(d, key)
                if isinstance(value, str) and is_file_ref(value):
                    paths[f"eval.zeroshot_classification.{i}.{key}"] = value
        for i, d in enumerate(self.zeroshot_retrieval):
            paths[f"eval.zeroshot_retrieval.{i}.root"] = d.root
            paths[f"eval.zeroshot_retrieval.{i}.captions"] = d.captions
        return paths


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

    @model_validator(mode="after")
    def _teacher_split(self):
        # a trained teacher's test images stay unseen whatever `seed` draws afterwards
        if self.train is not None and self.data.split_seed is None:
            self.data.split_seed = self.train.seed
        return self

    def input_paths(self) -> dict[str, str]:
        """{key path: filesystem path} of every file or folder the recipe reads, whatever
        its stages (outputs, output_dir and caches, are not among them)."""
        paths = {}
        if self.model.weights:
            paths["model.weights"] = self.model.weights
        if self.model.path:
            paths["model.path"] = self.model.path
        if self.train is not None and self.train.checkpoint:
            paths["train.checkpoint"] = self.train.checkpoint
        for key in ("root", "val_root", "captions"):
            value = getattr(self.data, key)
            if value:
                paths[f"data.{key}"] = value
        if self.distill is not None:
            for key in ("teacher", "student", "root"):
                value = getattr(self.distill, key)
                if value:
                    paths[f"distill.{key}"] = value
        if self.eval is not None:
            paths.update(self.eval.required_paths())
        return paths

    def required_paths(self) -> dict[str, str]:
        """{key path: filesystem path} of every input the recipe's stages read (the distill
        section's only when the recipe distils)."""
        return {k: v for k, v in self.input_paths().items()
                if not k.startswith("distill.") or "distill" in self.stages}
