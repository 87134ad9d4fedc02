"""`amp run`: a recipe's stages, each callable from Python, each resumable.

Stages write their outputs atomically into the run directory (`RunDir`) together with a
fingerprint of what they depend on; a rerun keeps every completed stage whose
fingerprint still matches and redoes the rest. Stages only move forward: each reads what
the earlier ones wrote. One process builds the original model and the calibration and
validation batches once, whatever the stages.

    train    demo only: SimCLR teacher on the digits: train.checkpoint when it matches
             the train settings (read only), else trained into teacher/
    score    AMPImportance over the calibration batches      -> scores.safetensors
             (checkpointed every amp.checkpoint_every batches; a killed run resumes)
    prune    AMPPruner over the validation batches            -> pruned/, prune.json
             (each decided block checkpointed; a killed run resumes at the next)
    distill  DeepSpeed distillation from the original model   -> distilled/
    eval     the recipe's eval tasks on every model            -> eval.json
             (the original's features cached: original_features.safetensors)
    report   everything in one report.json, table and plots   -> report.json, plots/

`Run` holds what the stages share (the run directory and its lock, the original model, the
datasets and loaders, the completed-stage check) and runs them in order; the stage bodies
are in search_stages.py (score, prune) and engine_stages.py (train, distill, eval, report).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
import yaml
from rich.console import Console
from torch import nn

from ..config import STAGES, DataConfig, Recipe
from ..core.adapter import get_adapter, vision_tower
from ..core.criterion import criterion_info
from ..core.models import create_model
from ..core.serialization import is_pruned_dir, load_pruned
from ..data import amp_loader, get_source
from ..data.loader import calibration_images
from ..utils import dist as ddp
from ..utils.io import (
    HashCache,
    atomic_write,
    content_fingerprint,
    fingerprint,
    no_space,
    out_of_room,
)
from ..utils.lock import FolderLock
from ..utils.tensors import CastBatches, resolve_device, resolve_dtype
from .engine_stages import EngineStages
from .layout import RunDir
from .search_stages import SearchStages
from .teacher import TeacherChoice, choose_teacher


def data_used(cfg: DataConfig, calib, val) -> dict[str, dict]:
    """Which images the score and prune stages used (the report says so): counts, the
    folder, and whether it was the whole folder (the authors' scale) or a subset. The
    validation count is what E_val reads: whole batches only."""
    val_folder = cfg.val_root if cfg.val_from == "val_root" else cfg.root
    val_images = len(val) // cfg.batch_size * cfg.batch_size
    calib_images = calibration_images(len(calib), cfg.batch_size)
    return {"calibration": {"images": calib_images, "folder": cfg.root,
                            "whole": cfg.calib_images == "all", "transform": cfg.transform},
            "validation": {"images": val_images, "folder": val_folder,
                           "whole": cfg.val_images == "all", "transform": cfg.transform}}


class Run(SearchStages, EngineStages):
    """One recipe executed in one run directory."""

    def __init__(self, recipe: Recipe, out: str | Path | None = None,
                 console: Console | None = None, show_progress: bool = True):
        self.recipe = recipe
        self.dir = RunDir(out or recipe.output_dir)
        self.console = console or Console()
        self.show_progress = show_progress
        self.distributed = ddp.init_from_env()
        self.device = resolve_device(recipe.amp.device)
        self.dtype = resolve_dtype(recipe.amp.dtype)
        self.seconds: dict[str, float] = {}  # stages run in this process
        self.reused: set[str] = set()  # stages kept from an earlier run
        self._original: nn.Module | None = None
        self._datasets: tuple | None = None
        self.data_used: dict[str, dict] = {}
        self._models: dict[str, nn.Module] = {}  # pruned / distilled made in this process
        self._lock: FolderLock | None = None

    def close(self) -> None:
        """Release the run directory (also released by the kernel if the process dies)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def preflight(self, stages: list[str]) -> None:
        """Refuse, before anything is written, stages whose inputs no earlier stage makes."""
        for stage in stages:
            if stage not in STAGES:
                raise ValueError(f"unknown stage {stage!r}; expected one of {list(STAGES)}")
        r = self.recipe
        if "distill" in stages and "prune" not in stages:
            student = Path(r.distill.student) if r.distill and r.distill.student else None
            if student is None and not is_pruned_dir(self.dir.pruned):
                from ..distill import DistillError

                raise DistillError(f"the prune stage's output: {self.dir.pruned} is not a "
                                   "pruned-model directory (run the prune stage first, or "
                                   "set distill.student)")
        if {"score", "prune"} & set(stages):
            get_source(r.data.kind).check(r.data)  # e.g. a captions file, read and checked
        if r.train is None and {"score", "prune", "distill"} & set(stages):
            self._check_input_size(self.original())  # reads and checks the weights first
        elif r.train is not None and "train" not in stages and (
                {"score", "prune", "distill", "eval"} & set(stages)):
            self.original()  # a teacher trained with the recipe's settings is there
        ahead = set(stages[:stages.index("eval")]) if "eval" in stages else set()
        if {"score", "prune", "distill"} & ahead and "train" not in stages:
            self.check_eval()  # e.g. zero-shot on a model without a text tower

    def _check_input_size(self, model: nn.Module) -> None:
        """One image of data.image_size through the model, so that a size the model does
        not take is refused before anything is written."""
        tower, adapter = vision_tower(model)
        size = self.recipe.data.image_size
        try:
            with torch.no_grad():
                adapter.features(tower, torch.zeros(1, 3, size, size))
        except (RuntimeError, AssertionError, ValueError) as e:
            raise ValueError(f"data.image_size: {size} does not fit the model "
                             f"({str(e).splitlines()[0]})") from None

    def start(self, stages: list[str]) -> None:
        """Check the run directory (no link out of it, writable) and the stages, lock the
        run directory (rank 0; a second run is refused naming this one), then write the
        recipe as run."""
        self.dir.check_writable()
        self.preflight(stages)
        if ddp.is_main():
            self._lock = FolderLock(self.dir.lock).acquire()
            if self._lock.previous:
                self.log(f"took over the lock of a run that ended without releasing it: "
                         f"pid {self._lock.previous.get('pid')}")
            src = yaml.safe_dump(self.recipe.model_dump(mode="json"), sort_keys=False)
            atomic_write(self.dir.recipe, src)
        ddp.barrier()

    def log(self, msg: str) -> None:
        if ddp.is_main():
            self.console.log(msg)

    # ---- the original model and the data, once per process -------------------------------
    def original_source(self) -> str:
        """Where the original model comes from: the demo's trained teacher, a saved
        teacher directory (distill.teacher), or the model spec and its weights."""
        r = self.recipe
        if r.train is not None:
            return str(self.teacher().path)
        if r.distill is not None and r.distill.teacher:
            return r.distill.teacher
        return r.model.weights or f"{r.model.library}:{r.model.name} <random init>"

    def _hashes(self) -> HashCache:
        # rank 0 keeps the cache file (it holds the run directory's lock)
        return HashCache(self.dir.hash_cache if ddp.is_main() and self._lock else None)

    def original_fingerprint(self) -> str:
        """What the original model is made of: the content of its weights (a file replaced
        at the same path, or a re-trained teacher, changes it), else the spec and seed."""
        src = Path(self.original_source())
        if src.exists():
            return content_fingerprint(src, self._hashes())
        return fingerprint(self.recipe.model, self.recipe.seed)

    def original(self) -> nn.Module:
        """The original (unpruned) model, built once; stages must not modify it."""
        if self._original is None:
            r = self.recipe
            if r.train is not None:
                choice = self.teacher()
                if not choice.ready:
                    raise FileNotFoundError(f"no teacher for the recipe's train settings: "
                                            f"{choice.why_not} (run the train stage first)")
                self._original = load_pruned(choice.path)
            elif r.distill is not None and r.distill.teacher:
                src = r.distill.teacher
                if not is_pruned_dir(src):
                    raise FileNotFoundError(f"distill.teacher: {src} holds no saved model")
                self._original = load_pruned(src)
            else:
                torch.manual_seed(r.seed)  # a random-init original is part of the recipe
                self._original = create_model(r.model).eval()
        return self._original

    def _working_copy(self, model: nn.Module, mutable: bool = False,
                      dtype: torch.dtype | None = None) -> nn.Module:
        """`model` on the run's device and dtype (as its library runs that precision: open_clip
        keeps LayerNorms in float32): the same object when nothing changes and the caller
        only reads, else a copy (the original stays as built)."""
        dtype = dtype or self.dtype
        if mutable or any(p.device != self.device or p.dtype != dtype
                          for p in model.parameters()):
            model = get_adapter(model).cast(copy.deepcopy(model), self.device, dtype)
        return model.eval()

    def datasets(self) -> tuple:
        """(calibration, validation) datasets in their seeded order, built once per process."""
        if self._datasets is None:
            r = self.recipe
            info = criterion_info(r.amp.criterion)
            extra = {"text": "text", "labels": "labels"}.get(info.needs)
            if info.needs == "text_or_labels":
                extra = "text" if "text" in get_source(r.data.kind).gives else "labels"
            self._datasets = get_source(r.data.kind).amp_datasets(
                r.data, r.seed, extra=extra, model=self.original(),
                show_progress=self.show_progress)
            calib, val = self._datasets
            self.data_used = data_used(r.data, calib, val)
        return self._datasets

    def loader(self, which: str, start_batch: int = 0,
               dtype: torch.dtype | None = None) -> CastBatches:
        """This rank's calibration or validation batches, streamed by a DataLoader, on the
        run's device and dtype; validation drops its last incomplete batch."""
        d = self.recipe.data
        calib, val = self.datasets()
        dataset = calib if which == "calibration" else val
        loader = amp_loader(dataset, d.batch_size, d.workers, which == "validation", start_batch)
        return CastBatches(loader, self.device, dtype or self.dtype)

    # ---- stages -------------------------------------------------------------------------
    def _done(self, stage: str, fp: str, output: Path) -> dict | None:
        """The metadata of a completed stage whose inputs are unchanged and whose output
        still holds what was written (content hash recorded at write time)."""
        try:
            meta = self.dir.stage_meta(stage)
        except ValueError as e:  # not JSON, or not an object: only the stage knows it again
            self.log(f"{stage}: {e}; computing it again")
            return None
        if meta is None or meta.get("fingerprint") != fp:
            return None
        if not output.exists() or meta.get("output_sha256") != content_fingerprint(
                output, self._hashes()):
            self.log(f"{stage}: {output} is missing or differs from what was written; "
                     "computing it again")
            return None
        return meta

    def teacher(self) -> TeacherChoice:
        """Where this run's teacher is (train recipes): the saved train.checkpoint when it
        matches the train settings, else RUN/teacher."""
        return choose_teacher(self.recipe, self.dir.teacher)

    def execute(self, stages: list[str] | None = None) -> dict:
        stages = list(stages or self.recipe.stages)
        try:
            self.start(stages)
            out = {}
            for stage in stages:
                self.log(f"[bold]stage {stage}[/bold]")
                t0 = time.perf_counter()
                try:
                    out[stage] = getattr(self, f"stage_{stage}")()
                except (OSError, RuntimeError) as e:  # a write no helper named: the directory
                    if not out_of_room(e):
                        raise
                    raise no_space(self.dir.root, None, f"the {stage} stage's outputs",
                                   str(e)) from e
                if stage not in self.reused and stage != "distill":  # distill records its own
                    self.seconds.setdefault(stage, time.perf_counter() - t0)
        finally:
            self.close()
        return out


def run(recipe: Recipe, out: str | Path | None = None, stages: list[str] | None = None,
        console: Console | None = None, show_progress: bool = True) -> dict:
    """Run a validated recipe (see `load_recipe`); returns each stage's output, the last
    being the report."""
    return Run(recipe, out, console, show_progress).execute(stages)


def evaluate_run(recipe: Recipe, run_dir: str | Path, tasks: list[str] | None = None,
                 show_progress: bool = True) -> dict:
    """The eval stage alone on an existing run directory (what `amp eval RUN` runs before
    rewriting the report); returns eval.json's content."""
    run = Run(recipe, run_dir, show_progress=show_progress)
    try:
        run.start(["eval"])
        return run.stage_eval(tasks)
    finally:
        run.close()
