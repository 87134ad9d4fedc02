"""`amp run`: a recipe's stages, each callable from Python, each resumable.

Stages write their outputs atomically into the run directory (`RunDir`) together with a
fingerprint of what they depend on; a rerun keeps every completed stage whose
fingerprint still matches and redoes the rest. Stages only move forward: each reads what
the earlier ones wrote. One process builds the original model and the calibration and
validation batches once, whatever the stages.

    train    demo only: SimCLR teacher on the digits, cached at recipe.train.checkpoint
    score    AMPImportance over the calibration batches      -> scores.safetensors
    prune    AMPPruner over the validation batches            -> pruned/, prune.json
    distill  DeepSpeed distillation from the original model   -> distilled/
    eval     the recipe's eval tasks on every model            -> eval.json
    report   everything in one report.json, table and plots   -> report.json, plots/
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
import yaml
from rich.console import Console
from safetensors.torch import load_file, save
from torch import nn

from ..config import STAGES, Recipe
from ..core.adapter import vision_tower
from ..core.criterion import criterion_info
from ..core.importance import AMPImportance
from ..core.models import create_model
from ..core.pruner import AMPPruner
from ..core.serialization import is_pruned_dir, load_pruned, read_manifest, save_pruned
from ..data import get_source
from ..utils import dist as ddp
from ..utils.io import atomic_write, deep_merge, fingerprint, read_json, write_json
from ..utils.tensors import cast_batch, resolve_device, resolve_dtype, split_batch
from .layout import RunDir


class Run:
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
        self.seconds: dict[str, float] = {}
        self._original: nn.Module | None = None
        self._batches: tuple[list, list] | None = None
        self._models: dict[str, nn.Module] = {}  # pruned / distilled made in this process

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

    def start(self, stages: list[str]) -> None:
        """Check the stages, then create the run directory with the recipe as run."""
        self.preflight(stages)
        if ddp.is_main():
            self.dir.root.mkdir(parents=True, exist_ok=True)
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
            return r.train.checkpoint
        if r.distill is not None and r.distill.teacher:
            return r.distill.teacher
        return r.model.weights or f"{r.model.library}:{r.model.name} <random init>"

    def original(self) -> nn.Module:
        """The original (unpruned) model, built once; stages must not modify it."""
        if self._original is None:
            r = self.recipe
            if r.train is not None or (r.distill is not None and r.distill.teacher):
                src = self.original_source()
                if not is_pruned_dir(src):
                    raise FileNotFoundError(f"{src} holds no saved model; run the train stage "
                                            "first" if r.train is not None else
                                            f"distill.teacher: {src} is not a saved model")
                self._original = load_pruned(src)
            else:
                torch.manual_seed(r.seed)  # a random-init original is part of the recipe
                self._original = create_model(r.model).eval()
        return self._original

    def _working_copy(self, model: nn.Module, mutable: bool = False) -> nn.Module:
        """`model` on the run's device and dtype: the same object when nothing changes
        and the caller only reads, else a copy (the original stays as built)."""
        p = next(model.parameters())
        if mutable or p.device != self.device or p.dtype != self.dtype:
            model = copy.deepcopy(model).to(self.device, self.dtype)
        return model.eval()

    def batches(self) -> tuple[list, list]:
        """(calibration, validation) batches of this rank, built once per process."""
        if self._batches is None:
            r = self.recipe
            info = criterion_info(r.amp.criterion)
            extra = {"text": "text", "labels": "labels"}.get(info.needs)
            if info.needs == "text_or_labels":
                extra = "text" if "text" in get_source(r.data.kind).gives else "labels"
            calib, val = get_source(r.data.kind).amp_batches(
                r.data, r.seed, extra=extra, model=self.original(),
                show_progress=self.show_progress)
            self._batches = ([ddp.shard(b, "calibration batch") for b in calib],
                             [ddp.shard(b, "validation batch") for b in val])
        return self._batches

    # ---- stages -------------------------------------------------------------------------
    def _done(self, stage: str, fp: str) -> dict | None:
        meta = self.dir.stage_meta(stage) if stage != "prune" or is_pruned_dir(
            self.dir.pruned) else None
        return meta if meta is not None and meta.get("fingerprint") == fp else None

    def stage_train(self) -> None:
        from ..data.digits import digits_splits
        from ..pretrain import train_simclr

        r = self.recipe
        if r.train is None:
            raise ValueError("stage 'train' needs a `train:` section in the recipe")
        ckpt = Path(r.train.checkpoint)
        # only what the teacher depends on: other data fields (calibration and validation
        # sizes) must not retrain, and so overwrite, a committed teacher
        d = r.data
        fp = fingerprint(r.model, r.train.model_dump(exclude={"checkpoint"}), d.kind,
                         d.image_size, d.mean, d.std, d.test_fraction, r.seed)
        if is_pruned_dir(ckpt) and read_manifest(ckpt)["meta"].get("fingerprint") == fp:
            self.log(f"teacher: cached at {ckpt}")
            return
        if r.data.kind != "digits":
            raise ValueError("the train stage pre-trains the demo teacher on data.kind: digits")
        torch.manual_seed(r.seed)  # the teacher's initialisation is part of the recipe
        model = create_model(r.model)
        raw = digits_splits(r.data, r.seed, raw=True)["train"].images
        history = train_simclr(model, raw, r.data.image_size, r.data.mean, r.data.std,
                               r.train.epochs, r.train.batch_size, r.train.lr,
                               r.train.temperature, r.seed, self.show_progress)
        if ddp.is_main():
            save_pruned(model, ckpt, meta={"fingerprint": fp, "simclr_loss": history})
        ddp.barrier()
        self._original, self._batches = model.eval(), None  # the trained teacher is the original
        self.log(f"teacher: trained {r.train.epochs} epochs (loss {history[0]:.3f} -> "
                 f"{history[-1]:.3f}), saved to {ckpt}")

    def importance(self) -> AMPImportance:
        a = self.recipe.amp
        return AMPImportance(a.inv_temperature, a.criterion, use_abs=a.use_abs,
                             show_progress=self.show_progress)

    def _score_fp(self) -> str:
        r = self.recipe
        return fingerprint(self.original_source(), r.model, r.data, r.amp.criterion,
                           r.amp.inv_temperature, r.amp.use_abs, r.amp.dtype, r.seed)

    def stage_score(self) -> dict[str, torch.Tensor]:
        fp = self._score_fp()
        if self._done("score", fp) and self.dir.scores.is_file():
            self.log("score: kept from an earlier run")
            return load_file(str(self.dir.scores))
        model = self._working_copy(self.original())
        tower, adapter = vision_tower(model)
        if self.recipe.amp.grad_checkpointing:
            model = self._working_copy(self.original(), mutable=True)
            tower, adapter = vision_tower(model)
            adapter.set_grad_checkpointing(tower, True)
        calib, _ = self.batches()
        imp = self.importance()
        t0 = time.perf_counter()
        scores = imp.accumulate(model, [cast_batch(b, self.device, self.dtype) for b in calib])
        self.seconds["score"] = time.perf_counter() - t0
        if ddp.is_main():
            atomic_write(self.dir.scores, save({k: v.contiguous() for k, v in scores.items()}))
            write_json(self.dir.scores_meta, {"fingerprint": fp, "batches": imp.num_batches,
                                              "seconds": self.seconds["score"]})
        ddp.barrier()  # other ranks look for the scores file only once it is written
        self.log(f"score: {len(scores)} MLPs over {imp.num_batches} calibration batches")
        return scores

    def stage_prune(self) -> dict:
        r = self.recipe
        fp = fingerprint(self._score_fp(), r.amp)
        done = self._done("prune", fp)
        if done is not None:
            self.log("prune: kept from an earlier run")
            return done["result"]
        if not self.dir.scores.is_file() or not self._done("score", self._score_fp()):
            raise FileNotFoundError(f"{self.dir.scores} is missing or was computed for other "
                                    "inputs: run the score stage first")
        scores = load_file(str(self.dir.scores))
        model = self._working_copy(self.original(), mutable=True)
        _, val = self.batches()
        val = [cast_batch(b, self.device, self.dtype) for b in val]
        imp = self.importance().load_scores(scores, model)
        c = r.amp.cache
        pruner = AMPPruner(
            model, split_batch(val[0])[0][:1], imp, val, r.amp.threshold, r.amp.max_steps,
            r.amp.round_to, cache_device_bytes=int(c.device_gib * 2**30),
            cache_host_bytes=int(c.host_gib * 2**30), cache_dir=c.dir,
            show_progress=self.show_progress, log=self.log,
            target=r.amp.target.spec() if r.amp.target else None)
        result = pruner.step().to_dict()
        self.seconds["prune"] = result["seconds"]
        model = model.float()
        if ddp.is_main():
            save_pruned(model, self.dir.pruned,
                        meta={"threshold": result["threshold"], "source": self.original_source()})
            write_json(self.dir.prune_meta, {"fingerprint": fp, "result": result})
        ddp.barrier()
        self._models["pruned"] = model
        b, a = result["mlp_params"]["before"], result["mlp_params"]["after"]
        self.log(f"prune: MLP parameters {b:,} -> {a:,} ({100 * (1 - a / b):.1f}% removed), "
                 f"{result['evaluations']} entropy evaluations, cache: {result['cache']}")
        return result

    def distiller(self):
        """The `Distiller` of this run's distill section (DeepSpeed set up, resumed)."""
        from ..config import DistillConfig
        from ..distill import Distiller, TrainImages

        r = self.recipe
        cfg = r.distill or DistillConfig()
        if cfg.root is not None:
            from torchvision.datasets import ImageFolder

            images, tensor_input = ImageFolder(cfg.root), False
        else:
            images, tensor_input = get_source(r.data.kind).train_images(r.data, r.seed)
        student = Path(cfg.student) if cfg.student else self.dir.pruned
        return Distiller(
            cfg, self.original(), student,
            TrainImages(images, tensor_input, r.data.image_size, r.data.mean, r.data.std),
            self.dir.distill, seed=r.seed,
            workers=r.data.workers if cfg.workers is None else cfg.workers,
            identity={"teacher": self.original_source(), "model": r.model.model_dump(),
                      "data": r.data.model_dump(), "distill_root": cfg.root},
            progress_bar=self.show_progress)

    def stage_distill(self) -> dict:
        t0 = time.perf_counter()
        distiller = self.distiller()
        out = distiller.run()
        if getattr(distiller, "distilled_model", None) is not None:
            self._models["distilled"] = distiller.distilled_model
        self.seconds["distill"] = time.perf_counter() - t0
        return out

    def _model_loader(self, role: str):
        if role == "teacher":
            return self.original
        if role in self._models:
            return lambda: self._models[role]
        return lambda: load_pruned(self.dir.model_dir(role))

    def stage_eval(self, tasks: list[str] | None = None) -> dict:
        from ..config import EvalConfig
        from ..evaluate import EvalContext, evaluate_models, list_tasks

        t0 = time.perf_counter()
        out = {}
        if ddp.is_main():  # evaluation is not sharded; rank 0 measures and writes
            r = self.recipe
            cfg = r.eval or EvalConfig()
            roles = ["teacher", *self.dir.models_present()]
            ctx = EvalContext(r.data, get_source(r.data.kind), r.seed,
                              resolve_device(cfg.device), self.dir.classifiers,
                              self.show_progress, self.log)
            results = evaluate_models(cfg, {role: self._model_loader(role) for role in roles},
                                      ctx, tasks)
            merged = deep_merge(read_json(self.dir.eval_json) or {}, results)
            order = list_tasks()
            merged["tasks"] = sorted(set((read_json(self.dir.eval_json) or {}).get("tasks", []))
                                     | set(results["tasks"]), key=order.index)
            write_json(self.dir.eval_json, merged)
            out = merged
        ddp.barrier()
        self.seconds["eval"] = time.perf_counter() - t0
        return out

    def stage_report(self) -> dict:
        from .report import build_report, render_table, write_report

        report = build_report(self.recipe, self.dir, seconds=self.seconds)
        if ddp.is_main():
            write_report(self.dir, report)
            self.console.print(render_table(report))
            self.log(f"report: {self.dir.report_json}")
        return report

    def execute(self, stages: list[str] | None = None) -> dict:
        stages = list(stages or self.recipe.stages)
        self.start(stages)
        out = {}
        for stage in stages:
            self.log(f"[bold]stage {stage}[/bold]")
            t0 = time.perf_counter()
            out[stage] = getattr(self, f"stage_{stage}")()
            self.seconds.setdefault(stage, time.perf_counter() - t0)
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
    run.start(["eval"])
    return run.stage_eval(tasks)
