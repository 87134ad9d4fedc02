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
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
import yaml
from rich.console import Console
from safetensors.torch import save
from torch import nn

from ..config import STAGES, DataConfig, Recipe, SearchConfig
from ..core.adapter import get_adapter, vision_tower
from ..core.criterion import criterion_info
from ..core.importance import AMPImportance, ScoreState
from ..core.models import create_model
from ..core.pruner import AMPPruner
from ..core.search import SearchState
from ..core.serialization import is_pruned_dir, load_pruned, read_manifest, save_pruned
from ..data import amp_loader, get_source
from ..data.loader import calibration_images
from ..utils import dist as ddp
from ..utils.finite import NonFiniteError, check_inputs, locate
from ..utils.io import (
    HashCache,
    atomic_write,
    content_fingerprint,
    deep_merge,
    fingerprint,
    no_space,
    out_of_room,
    read_json,
    write_json,
)
from ..utils.lock import FolderLock
from ..utils.tensors import CastBatches, resolve_device, resolve_dtype, split_batch
from .layout import RunDir
from .outputs import (
    StageOutputError,
    check_neuron_values,
    check_prune_result,
    check_search_state,
    mlp_widths,
    read_tensors,
)
from .report import trace_summary
from .teacher import TeacherChoice, choose_teacher, teacher_fingerprint, train_teacher


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

    def stage_train(self) -> None:
        r = self.recipe
        if r.train is None:
            raise ValueError("stage 'train' needs a `train:` section in the recipe")
        choice = self.teacher()
        if choice.ready and self._teacher_intact(choice.path):
            where = "cached at" if choice.committed else "kept from an earlier run:"
            self.log(f"teacher: {where} {choice.path}")
            self.reused.add("train")
            return
        model, history = train_teacher(r, self.show_progress)
        if ddp.is_main():  # never over train.checkpoint: a saved teacher is read only
            save_pruned(model, self.dir.teacher, meta={"fingerprint": teacher_fingerprint(r),
                                                       "simclr_loss": history})
        ddp.barrier()
        self._original, self._datasets = model, None  # the trained teacher is the original
        self.log(f"teacher: trained {r.train.epochs} epochs (loss {history[0]:.3f} -> "
                 f"{history[-1]:.3f}), saved to {self.dir.teacher}")

    def _teacher_intact(self, ckpt: Path) -> bool:
        try:
            self._original = load_pruned(ckpt).eval()
        except ValueError as e:
            self.log(f"teacher: {e}; training it again")
            return False
        return True

    def _locate(self, stage: str, model: nn.Module, batches: list, what: str):
        model = self._working_copy(model)
        tower, adapter = vision_tower(model)
        return locate(stage, tower, batches, what,
                      lambda b: adapter.features(tower, split_batch(b)[0]))

    def importance(self) -> AMPImportance:
        a = self.recipe.amp
        return AMPImportance(a.inv_temperature, a.criterion, use_abs=a.use_abs,
                             show_progress=self.show_progress)

    def _score_fp(self) -> str:
        r = self.recipe
        captions = (content_fingerprint(r.data.captions, self._hashes()) if r.data.captions
                    else None)
        return fingerprint(self.original_source(), self.original_fingerprint(), r.model,
                           r.data, captions, r.amp.criterion, r.amp.inv_temperature,
                           r.amp.use_abs, r.amp.dtype, r.seed)

    def stage_score(self) -> dict[str, torch.Tensor]:
        fp = self._score_fp()
        kept = self._kept_scores(fp, redo=True)
        if kept is not None:
            self.log("score: kept from an earlier run")
            self.reused.add("score")
            return kept
        checkpointing = self.recipe.amp.grad_checkpointing  # a switch on the model: a copy
        model = self._working_copy(self.original(), mutable=checkpointing)
        if checkpointing:
            tower, adapter = vision_tower(model)
            adapter.set_grad_checkpointing(tower, True)
        check_inputs("score", model, [], "calibration")  # weights; batches when they go wrong
        imp = self.importance()
        resume = self._score_resume(fp)
        t0 = time.perf_counter()
        scores = imp.accumulate(
            model, self.loader("calibration", resume.batches if resume else 0), resume=resume,
            checkpoint=lambda state: self._score_checkpoint(fp, state),
            every=self.recipe.amp.checkpoint_every)
        self.seconds["score"] = time.perf_counter() - t0
        if not all(bool(torch.isfinite(v).all()) for v in scores.values()):
            raise self._locate("score", model, self.loader("calibration"), "calibration")
        if ddp.is_main():
            atomic_write(self.dir.scores, save({k: v.contiguous() for k, v in scores.items()}))
            write_json(self.dir.scores_meta, {
                "fingerprint": fp,
                "output_sha256": content_fingerprint(self.dir.scores, self._hashes()),
                "batches": imp.num_batches, "seconds": self.seconds["score"],
                "data": self.data_used["calibration"]})
        ddp.barrier()  # other ranks look for the scores file only once it is written
        self.dir.score_progress(ddp.rank()).unlink(missing_ok=True)
        self.log(f"score: {len(scores)} MLPs over {imp.num_batches} calibration batches")
        return scores

    def _kept_scores(self, fp: str, redo: bool) -> dict[str, torch.Tensor] | None:
        """The scores of a completed score stage for these inputs, checked against the
        model's MLPs; None when there are none, or (`redo`) when the file fails the check
        (logged: the stage computes them again)."""
        if not self._done("score", fp, self.dir.scores):
            return None
        try:
            tensors, _ = read_tensors(self.dir.scores)
            return check_neuron_values(self.dir.scores, tensors, mlp_widths(self.original()))
        except StageOutputError as e:
            if not redo:
                raise StageOutputError(f"{e}: run the score stage again") from None
            self.log(f"score: {e}; computing the scores again")
            return None

    def _score_checkpoint(self, fp: str, state: ScoreState) -> None:
        """This rank's partial sums, position and sampler (rank, world size), atomically."""
        meta = {"fingerprint": fp, "batches": str(state.batches), "rank": str(ddp.rank()),
                "world_size": str(ddp.world_size())}
        atomic_write(self.dir.score_progress(ddp.rank()),
                     save({k: v.contiguous() for k, v in state.sums.items()}, metadata=meta))

    def _score_resume(self, fp: str) -> ScoreState | None:
        """The partial sums of a killed score stage, when every rank has them for the same
        inputs, sampler and position; else None (start over)."""
        path, state = self.dir.score_progress(ddp.rank()), None
        if path.is_file():
            try:
                sums, meta = read_tensors(path)
                if meta == {"fingerprint": fp, "batches": meta.get("batches"),
                            "rank": str(ddp.rank()), "world_size": str(ddp.world_size())}:
                    if not str(meta["batches"]).isdigit():
                        raise StageOutputError(f"{path}: batches {meta['batches']!r} is not a "
                                               "count of batches")
                    state = ScoreState(check_neuron_values(path, sums,
                                                           mlp_widths(self.original())),
                                       int(meta["batches"]))
            except StageOutputError as e:
                self.log(f"score: {e}; starting the score stage over")
        position = float(state.batches if state else -1)
        same = ddp.agree(position) ** 2 == ddp.agree(position * position)  # no spread
        if not same or position < 0:
            return None  # some rank has none, or another position: all start over
        self.log(f"score: resumed after {state.batches} calibration batches")
        return state

    def stage_prune(self) -> dict:
        r = self.recipe
        # the cache settings change where states are kept, never the result; default search
        # settings leave the fingerprint of runs made before they existed as it was
        fp = fingerprint(self._score_fp(), r.amp.model_dump(
            exclude={"cache"} | ({"search"} if r.amp.search == SearchConfig() else set())))
        done = self._kept_prune(fp)
        if done is not None:
            self.log("prune: kept from an earlier run")
            self.reused.add("prune")
            return done["result"]
        scores = self._kept_scores(self._score_fp(), redo=False)
        if scores is None:
            raise FileNotFoundError(f"{self.dir.scores} is missing or was computed for other "
                                    "inputs: run the score stage first")
        search_dtype = resolve_dtype(r.amp.search_dtype or r.amp.dtype)
        model = self._working_copy(self.original(), mutable=True, dtype=search_dtype)
        check_inputs("prune", model, [], "validation")
        val = self.loader("validation", dtype=search_dtype)
        imp = self.importance().load_scores(scores, model)
        try:
            resume = check_search_state(self.dir.prune_progress,
                                        read_json(self.dir.prune_progress), fp,
                                        mlp_widths(self.original()))
        except (StageOutputError, ValueError) as e:  # damaged: not the killed run's state
            self.log(f"prune: {e}; starting the search over")
            resume = None

        def on_decided(state: SearchState) -> None:
            if ddp.is_main():
                write_json(self.dir.prune_progress, {"fingerprint": fp,
                                                     "state": state.to_dict()})

        c = r.amp.cache
        # budget mode and global allocation decide every size at the end: nothing to resume
        one_shot = r.amp.target is not None or r.amp.search.allocation == "global"
        example = split_batch(next(iter(val)))[0][:1]
        pruner = AMPPruner(
            model, example, imp, val, r.amp.threshold, r.amp.max_steps,
            r.amp.round_to, cache_device_bytes=int(c.device_gib * 2**30),
            cache_host_bytes=int(c.host_gib * 2**30), cache_dir=c.dir,
            cache_disk_bytes=None if c.disk_gib is None else int(c.disk_gib * 2**30),
            show_progress=self.show_progress, log=self.log,
            resume=None if one_shot else resume, on_decided=None if one_shot else on_decided,
            search_head=r.amp.search_head, target=r.amp.target.spec() if r.amp.target else None,
            measure=r.amp.search.measure, allocation=r.amp.search.allocation_spec(),
            confidence=r.amp.search.confidence)
        try:
            result = pruner.step().to_dict()
        except NonFiniteError as e:
            # the search's error names the MLP; the original model shows where it began
            raise self._locate("prune", self.original(), val, "validation") from e
        self.seconds["prune"] = result["seconds"]
        model = model.float()
        if ddp.is_main():
            save_pruned(model, self.dir.pruned,
                        meta={"threshold": result["threshold"], "source": self.original_source()})
            write_json(self.dir.prune_meta, {
                "fingerprint": fp,
                "output_sha256": content_fingerprint(self.dir.pruned, self._hashes()),
                "result": result, "data": self.data_used["validation"]})
            self.dir.prune_progress.unlink(missing_ok=True)
        ddp.barrier()
        self._models["pruned"] = model
        b, a = result["mlp_params"]["before"], result["mlp_params"]["after"]
        search = {"measure": r.amp.search.measure}
        self.log(f"prune: MLP parameters {b:,} -> {a:,} ({100 * (1 - a / b):.1f}% removed), "
                 f"{trace_summary({**result, **result['extra'], 'search': search})}, "
                 f"cache: {result['cache']}")
        alloc = result["extra"].get("allocation")
        if alloc is not None:
            self.log(f"prune: global allocation by {alloc['measure']}: predicted "
                     f"{alloc['predicted']:.4g}, verified {alloc['verified']:.4g}, "
                     f"{alloc['curve_points']} curve points"
                     + (f"; {alloc['message']}" if alloc["message"] else ""))
        return result

    def _kept_prune(self, fp: str) -> dict | None:
        """prune.json of a completed prune stage for these inputs whose result is the
        pruned model's (sizes within the original widths and equal to the saved model's);
        else None (logged when the file fails the check: the search runs again)."""
        done = self._done("prune", fp, self.dir.pruned)
        if done is None:
            return None
        try:
            result = check_prune_result(self.dir.prune_meta, done.get("result"),
                                        mlp_widths(self.original()))
            saved = read_manifest(self.dir.pruned).get("hidden_sizes")
            if result["hidden_sizes"] != saved:
                raise StageOutputError(
                    f"{self.dir.prune_meta}: result.hidden_sizes {result['hidden_sizes']} are "
                    f"not the pruned model's {saved}")
        except StageOutputError as e:
            self.log(f"prune: {e}; searching again")
            return None
        return done

    def distiller(self):
        """The `Distiller` of this run's distill section (DeepSpeed set up, resumed)."""
        from ..config import DistillConfig
        from ..distill import Distiller, TrainImages

        r = self.recipe
        cfg = r.distill or DistillConfig()
        if cfg.root is not None:
            from ..data.images import image_files

            images, tensor_input = image_files(cfg.root, key="distill.root"), False
        else:
            images, tensor_input = get_source(r.data.kind).train_images(r.data, r.seed)
        student = Path(cfg.student) if cfg.student else self.dir.pruned
        return Distiller(
            cfg, self.original(), student,
            TrainImages(images, tensor_input, r.data.image_size, r.data.mean, r.data.std),
            self.dir.distill, seed=r.seed,
            workers=r.data.workers if cfg.workers is None else cfg.workers,
            identity={"teacher": self.original_source(),
                      "teacher_content": self.original_fingerprint(),
                      "model": r.model.model_dump(),
                      "data": r.data.model_dump(), "distill_root": cfg.root},
            progress_bar=self.show_progress)

    def stage_distill(self) -> dict:
        distiller = self.distiller()
        out = distiller.run()  # its result records the seconds the training took
        if getattr(distiller, "distilled_model", None) is not None:
            self._models["distilled"] = distiller.distilled_model
        if out.get("reused"):
            self.reused.add("distill")
        return out

    def _model_loader(self, role: str):
        if role == "teacher":
            return self.original
        if role in self._models:
            return lambda: self._models[role]
        return lambda: load_pruned(self.dir.model_dir(role))

    def stage_eval(self, tasks: list[str] | None = None) -> dict:
        from ..config import EvalConfig
        from ..evaluate import EvalContext, OriginalFeatures, evaluate_models, list_tasks

        t0 = time.perf_counter()
        out = {}
        if ddp.is_main():  # evaluation is not sharded; rank 0 measures and writes
            r = self.recipe
            cfg = r.eval or EvalConfig()
            roles = ["teacher", *self.dir.models_present()]
            # the original's features, cached in the run directory, are the fixed side
            # of the tasks that compare with it (and the teacher role's own features)
            reference = OriginalFeatures(self.original, self.dir.original_features,
                                         self.original_fingerprint())
            ctx = EvalContext(r.data, get_source(r.data.kind), r.seed,
                              resolve_device(cfg.device), self.dir.classifiers,
                              self.show_progress, self.log, reference=reference)
            results = evaluate_models(cfg, {role: self._model_loader(role) for role in roles},
                                      ctx, tasks)
            merged = deep_merge(read_json(self.dir.eval_json) or {}, results)
            order = list_tasks()
            merged["tasks"] = sorted(set((read_json(self.dir.eval_json) or {}).get("tasks", []))
                                     | set(results["tasks"]), key=order.index)
            merged["eval_seconds"] = round(time.perf_counter() - t0, 2)
            write_json(self.dir.eval_json, merged)
            out = merged
        ddp.barrier()
        self.seconds["eval"] = time.perf_counter() - t0
        return out

    def stage_report(self) -> dict:
        from .report import build_report, render_table, write_report

        report = build_report(self.recipe, self.dir, seconds=self.seconds, reused=self.reused)
        if ddp.is_main():
            write_report(self.dir, report)
            self.console.print(render_table(report))
            self.log(f"report: {self.dir.report_json}")
        return report

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
