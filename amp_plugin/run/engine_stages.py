"""The stages of `amp run` that hand the models to an engine (`Run` mixes them in): train
(the demo's SimCLR teacher), distill (DeepSpeed), eval (the recipe's tasks on every model)
and report (one report.json, table and plots)."""

from __future__ import annotations

import time
from pathlib import Path

from ..core.serialization import load_pruned, save_pruned
from ..data import get_source
from ..utils import dist as ddp
from ..utils.io import deep_merge, read_json, write_json
from ..utils.tensors import resolve_device
from .teacher import teacher_fingerprint, train_teacher


class EngineStages:
    """`Run`'s train, distill, eval and report stages; they read the run's recipe, directory
    and original model (`Run`)."""

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

    def _eval_context(self, identify: bool = True):
        from ..config import EvalConfig
        from ..evaluate import EvalContext, OriginalFeatures

        r = self.recipe
        cfg = r.eval or EvalConfig()
        # the original's features, cached in the run directory, are the fixed side of the
        # tasks that compare with it (and the teacher role's own features); the checks
        # need not hash the original's weights
        reference = OriginalFeatures(self.original, self.dir.original_features,
                                     self.original_fingerprint() if identify else "")
        return cfg, EvalContext(r.data, get_source(r.data.kind), r.seed,
                                resolve_device(cfg.device), self.dir.classifiers,
                                self.show_progress, self.log, reference=reference)

    def check_eval(self, tasks: list[str] | None = None) -> None:
        """The eval tasks' checks on the original model (e.g. zero-shot needs a text tower
        and its tokenizer), so that a task the model cannot run is refused before the
        stages ahead of eval do any work."""
        from ..evaluate import check_tasks

        cfg, ctx = self._eval_context(identify=False)
        check_tasks(cfg, ctx, self.original(), tasks)

    def stage_eval(self, tasks: list[str] | None = None) -> dict:
        from ..evaluate import evaluate_models, list_tasks

        t0 = time.perf_counter()
        out = {}
        if ddp.is_main():  # evaluation is not sharded; rank 0 measures and writes
            cfg, ctx = self._eval_context()
            roles = ["teacher", *self.dir.models_present()]
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
