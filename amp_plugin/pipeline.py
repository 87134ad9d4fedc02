"""`amp run`: a recipe's stages, each callable from Python, each resumable.

Stages write their outputs atomically into the run directory together with a
fingerprint of the recipe parts they depend on; a rerun keeps every completed stage
whose fingerprint still matches and redoes the rest.

    train    demo only: SimCLR teacher on the digits, cached at recipe.train.checkpoint
    score    AMPImportance over the calibration batches      -> scores.safetensors
    prune    AMPPruner over the validation batches            -> pruned/, prune.json
    distill  DeepSpeed distillation from the original model   -> distilled/
    eval     kNN / linear probe (and zero-shot where set up)  -> eval.json
    report   everything in one report.json, table and plots   -> report.json, plots/
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
import yaml
from rich.console import Console
from safetensors.torch import load_file, save
from torch import nn

from . import distributed as ddp
from .adapters import vision_tower
from .atomic import atomic_write
from .importance import AMPImportance
from .models import create_model
from .recipe import Recipe
from .report import write_json
from .search import AMPPruner
from .serialization import load_pruned, read_manifest, save_pruned

DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _fingerprint(*parts) -> str:
    blob = json.dumps([p.model_dump() if hasattr(p, "model_dump") else p for p in parts],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Run:
    """One recipe executed in one run directory."""

    def __init__(self, recipe: Recipe, out: str | Path | None = None,
                 console: Console | None = None, show_progress: bool = True):
        self.recipe = recipe
        self.dir = Path(out or recipe.output_dir)
        self.console = console or Console()
        self.show_progress = show_progress
        self.distributed = ddp.init_from_env()
        dev = recipe.amp.device
        if dev == "auto":
            dev = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(dev)
        self.dtype = DTYPES[recipe.amp.dtype]
        self.seconds: dict[str, float] = {}
        if ddp.is_main():
            self.dir.mkdir(parents=True, exist_ok=True)
            src = yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
            (self.dir / "recipe.yaml").write_text(src)
        ddp.barrier()

    def log(self, msg: str) -> None:
        if ddp.is_main():
            self.console.log(msg)

    # ---- models -------------------------------------------------------------------------
    def teacher_source(self) -> str:
        r = self.recipe
        return r.train.checkpoint if r.train is not None else (r.model.weights or "<random init>")

    def teacher(self) -> nn.Module:
        """A fresh copy of the original (unpruned) model."""
        r = self.recipe
        if r.train is not None:
            if not (Path(r.train.checkpoint) / "amp.json").is_file():
                raise FileNotFoundError(f"train.checkpoint {r.train.checkpoint} does not exist; "
                                        "run the train stage first")
            return load_pruned(r.train.checkpoint)
        return create_model(r.model)

    def _prepare(self, model: nn.Module) -> nn.Module:
        return model.to(self.device, self.dtype).eval()

    # ---- stages -------------------------------------------------------------------------
    def _done(self, marker: Path, fingerprint: str) -> bool:
        if not marker.is_file():
            return False
        try:
            return json.loads(marker.read_text()).get("fingerprint") == fingerprint
        except json.JSONDecodeError:
            return False

    def stage_train(self) -> None:
        r = self.recipe
        if r.train is None:
            raise ValueError("stage 'train' needs a `train:` section in the recipe")
        ckpt = Path(r.train.checkpoint)
        fp = _fingerprint(r.model, r.train, r.data, r.seed)
        if (ckpt / "amp.json").is_file() and read_manifest(ckpt)["meta"].get("fingerprint") == fp:
            self.log(f"teacher: cached at {ckpt}")
            return
        from .contrastive import train_simclr
        from .data import digits_splits

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
        self.log(f"teacher: trained {r.train.epochs} epochs (loss {history[0]:.3f} -> "
                 f"{history[-1]:.3f}), saved to {ckpt}")

    def batches(self) -> tuple[list, list]:
        """(calibration, validation) global batches; each rank keeps its shard."""
        r = self.recipe
        if r.data.kind == "coco":
            from .captions import caption_batches

            calib, val = caption_batches(r, self.teacher(), show_progress=self.show_progress)
        else:
            from .data import amp_batches

            calib, val = amp_batches(r.data, r.seed)
        return ([ddp.shard(b, "calibration batch") for b in calib],
                [ddp.shard(b, "validation batch") for b in val])

    def importance(self) -> AMPImportance:
        a = self.recipe.amp
        return AMPImportance(a.inv_temperature, a.criterion, use_abs=a.use_abs,
                             show_progress=self.show_progress)

    def _score_fp(self) -> str:
        r = self.recipe
        return _fingerprint(self.teacher_source(), r.model, r.data, r.amp.criterion,
                            r.amp.inv_temperature, r.amp.use_abs, r.amp.dtype, r.seed)

    def stage_score(self) -> dict[str, torch.Tensor]:
        fp, path = self._score_fp(), self.dir / "scores.safetensors"
        if self._done(self.dir / "scores.json", fp) and path.is_file():
            self.log("score: kept from an earlier run")
            return load_file(str(path))
        model = self._prepare(self.teacher())
        tower, adapter = vision_tower(model)
        if self.recipe.amp.grad_checkpointing:
            adapter.set_grad_checkpointing(tower, True)
        calib, _ = self.batches()
        imp = self.importance()
        t0 = time.perf_counter()
        scores = imp.accumulate(model, [_cast(b, self.device, self.dtype) for b in calib])
        self.seconds["score"] = time.perf_counter() - t0
        if ddp.is_main():
            atomic_write(path, save({k: v.contiguous() for k, v in scores.items()}))
            write_json(self.dir / "scores.json", {"fingerprint": fp, "batches": imp.num_batches,
                                                  "seconds": self.seconds["score"]})
        ddp.barrier()  # other ranks look for the scores file only once it is written
        self.log(f"score: {len(scores)} MLPs over {imp.num_batches} calibration batches")
        return scores

    def stage_prune(self) -> dict:
        r = self.recipe
        fp = _fingerprint(self._score_fp(), r.amp)
        marker = self.dir / "prune.json"
        if self._done(marker, fp) and (self.dir / "pruned" / "amp.json").is_file():
            self.log("prune: kept from an earlier run")
            return json.loads(marker.read_text())["result"]
        scores = self.stage_score()  # kept from disk when already computed
        model = self._prepare(self.teacher())
        _, val = self.batches()
        val = [_cast(b, self.device, self.dtype) for b in val]
        imp = self.importance().load_scores(scores, model)
        c = r.amp.cache
        pruner = AMPPruner(
            model, _images(val[0])[:1], imp, val, r.amp.threshold, r.amp.max_steps,
            r.amp.round_to, cache_device_bytes=int(c.device_gib * 2**30),
            cache_host_bytes=int(c.host_gib * 2**30), cache_dir=c.dir,
            show_progress=self.show_progress, log=self.log)
        result = pruner.step().to_dict()
        self.seconds["prune"] = result["seconds"]
        if ddp.is_main():
            save_pruned(model.float(), self.dir / "pruned",
                        meta={"threshold": r.amp.threshold, "source": self.teacher_source()})
            write_json(marker, {"fingerprint": fp, "result": result})
        ddp.barrier()
        b, a = result["mlp_params"]["before"], result["mlp_params"]["after"]
        self.log(f"prune: MLP parameters {b:,} -> {a:,} ({100 * (1 - a / b):.1f}% removed), "
                 f"{result['evaluations']} entropy evaluations, cache: {result['cache']}")
        return result

    def stage_distill(self) -> dict:
        from .distill import distill

        t0 = time.perf_counter()
        out = distill(self.recipe, self.dir, progress_bar=self.show_progress)
        self.seconds["distill"] = time.perf_counter() - t0
        return out

    def stage_eval(self) -> dict:
        from .evaluate import evaluate_run

        t0 = time.perf_counter()
        out = {}
        if ddp.is_main():  # evaluation is not sharded; rank 0 measures and writes
            out = evaluate_run(self.recipe, self.dir, show_progress=self.show_progress,
                               log=self.log)
        ddp.barrier()
        self.seconds["eval"] = time.perf_counter() - t0
        return out

    def stage_report(self) -> dict:
        from .report import build_report, render_table, write_report

        report = build_report(self.recipe, self.dir, seconds=self.seconds)
        if ddp.is_main():
            write_report(self.dir, report)
            self.console.print(render_table(report))
            self.log(f"report: {self.dir / 'report.json'}")
        return report

    STAGE_FNS: dict[str, str] = {
        "train": "stage_train", "score": "stage_score", "prune": "stage_prune",
        "distill": "stage_distill", "eval": "stage_eval", "report": "stage_report",
    }

    def execute(self, stages: list[str] | None = None) -> dict:
        out = {}
        for stage in stages or self.recipe.stages:
            self.log(f"[bold]stage {stage}[/bold]")
            t0 = time.perf_counter()
            out[stage] = getattr(self, self.STAGE_FNS[stage])()
            self.seconds.setdefault(stage, time.perf_counter() - t0)
        return out


def _images(batch):
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _cast(batch, device, dtype):
    def one(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.to(device, dtype)
        return t.to(device) if isinstance(t, torch.Tensor) else t
    return tuple(one(t) for t in batch) if isinstance(batch, (tuple, list)) else one(batch)


def run(recipe: Recipe, out: str | Path | None = None, stages: list[str] | None = None,
        console: Console | None = None, show_progress: bool = True) -> dict:
    """Run a validated recipe (see amp_plugin.recipe.load_recipe); returns each stage's
    output, the last being the report."""
    return Run(recipe, out, console, show_progress).execute(stages)


