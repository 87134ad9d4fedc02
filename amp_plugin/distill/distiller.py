"""Distillation of a pruned model from the original (docs/algorithm.md section 5), on DeepSpeed.

The teacher is the original vision encoder, frozen; the student is the pruned one. Both
give their tokens before the final norm/projection (`Adapter.final_tokens`); the loss is
MSE(pooled) + MSE(patch tokens), or a symmetric KL between the two models' batch
similarity distributions (`loss: kl_entropy`).

DeepSpeed does the distributed work: its engine (ZeRO stage 1-3, CPU/NVMe offload passed
through to its own config), its checkpoints (optimizer, scheduler and the step in
`client_state`) and its ZeRO-to-fp32 consolidation. `deepspeed --num_gpus N $(which amp)
distill RECIPE` runs N ranks; without a launcher the same code runs one rank in a
single-process group.

`Distiller` takes its own config section and explicit inputs (the teacher module, the
student directory, the training images, where to write); the run pipeline wires them.
DeepSpeed's process group and config are in engine.py, the safe reading of its
checkpoints in checkpoints.py, the trained module in token_model.py.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..config import DistillConfig
from ..core.adapter import vision_tower
from ..core.serialization import load_pruned, read_manifest, save_pruned
from ..utils.io import (
    NoSpaceError,
    append_line,
    atomic_write,
    fingerprint,
    follow_umask,
    free_bytes,
    no_space,
    room_for,
)
from ..utils.progress import progress
from .checkpoints import read_tag, step_tag, tag_step, weights_only_loads
from .data import DistillData, distill_data
from .engine import deepspeed_config, init_distributed, resolve_dtype
from .inputs import DistillError, DistillPaths, TrainImages
from .losses import make_loss
from .schedule import WarmupCosine, param_groups
from .token_model import TokenModel, untrained_parameters


def read_loss_log(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Distiller:
    """One distillation run: set up, `train()`, `consolidate()`; `run()` does both.

        Distiller(cfg, teacher, student_dir, images, paths, seed=0, identity={...}).run()

    `teacher` is the original model (read only: a copy is moved to the training device
    and dtype when they differ); `student_dir` a `save_pruned` directory; `identity`
    names what else the training depends on (data, teacher source) for the checkpoints'
    fingerprint. Everything that can be wrong with the inputs is checked before the
    first step; a rerun resumes from the newest checkpoint.
    """

    def __init__(self, cfg: DistillConfig, teacher: nn.Module, student_dir: str | Path,
                 images: TrainImages, paths: DistillPaths, seed: int = 0,
                 workers: int = 0, identity: dict | None = None, progress_bar: bool = True):
        self.cfg, self.paths, self.seed = cfg, paths, seed
        self.identity = identity or {}
        self.progress_bar = progress_bar
        self.student_dir = Path(student_dir)
        if not (self.student_dir / "amp.json").is_file():
            raise DistillError(f"distill.student: {self.student_dir} is not a pruned-model "
                               "directory (save_pruned output with amp.json); run the prune "
                               "stage first")
        self.rank, self.world_size, self.local_rank = init_distributed()

        from deepspeed.accelerator import get_accelerator

        self.device = get_accelerator().current_device_name()
        self._limit_cpu_threads()
        self.dtype = resolve_dtype(self.cfg.dtype, torch.device(self.device).type)
        self.data: DistillData = distill_data(
            images.images, images.tensor_input, images.image_size, images.mean, images.std,
            seed, self.cfg.min_crop, self.cfg.batch_size, self.cfg.grad_accum,
            self.world_size, self.rank, workers,
            pin_memory=torch.device(self.device).type == "cuda", augment=self.cfg.augment)
        if self.data.steps_per_epoch < 1:
            raise DistillError(
                f"distill.batch_size: {len(self.data.dataset)} training images make no full "
                f"step of {self.data.global_batch} images (batch_size x grad_accum x ranks)")
        per_epoch = self.data.steps_per_epoch
        self.total_steps = self.cfg.max_steps or self.cfg.epochs * per_epoch
        self.warmup_steps = min(self.total_steps, max(1, round(self.cfg.warmup_epochs
                                                                 * per_epoch)))
        self.lr = self.cfg.base_lr * self.data.global_batch / 256
        if self.cfg.min_lr > self.lr:
            raise DistillError(f"distill.min_lr {self.cfg.min_lr} exceeds the peak lr "
                               f"{self.lr:.3g} (base_lr x global batch {self.data.global_batch}"
                               " / 256)")
        self.ds_config = deepspeed_config(self.cfg, self.world_size, self.dtype, self.lr,
                                          torch.device(self.device).type)
        self._check_deepspeed_config()
        self.loss_fn = make_loss(self.cfg)
        self._build_models(teacher)
        self.paths.checkpoints.mkdir(parents=True, exist_ok=True)
        self.step = self._resume()

    # ---- setup ---------------------------------------------------------------------------
    def _limit_cpu_threads(self) -> None:
        # Ranks sharing a CPU each default to all cores; split them unless the user chose.
        local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", 1)))
        if self.device == "cpu" and local > 1 and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))

    def _check_deepspeed_config(self) -> None:
        from deepspeed.runtime.config import DeepSpeedConfig

        try:
            DeepSpeedConfig(self.ds_config)
        except Exception as e:  # DeepSpeed raises assertion and pydantic errors alike
            raise DistillError(f"distill: DeepSpeed rejects the config built from the recipe "
                               f"({type(e).__name__}: {e})") from e

    def _build_models(self, teacher: nn.Module) -> None:
        import deepspeed

        t_tower, t_adapter = vision_tower(teacher)
        p = next(t_tower.parameters())
        if p.device != torch.device(self.device) or p.dtype != self.dtype:
            t_tower = copy.deepcopy(t_tower)  # the caller's model stays as it is
        # frozen by running it without gradient (`_targets`); its flags are left as they are
        t_tower.eval()
        self.teacher = TokenModel(t_tower, t_adapter).to(self.device, self.dtype).eval()
        probe = self.data.dataset[(0, self.seed)].unsqueeze(0)
        frozen = untrained_parameters(t_tower, t_adapter, probe.to(self.device, self.dtype))
        # the untrained final norm / head, kept in full precision for the consolidation
        self.restore = {n: teacher_p.detach().float().cpu().clone() for n, teacher_p in
                        vision_tower(teacher)[0].named_parameters() if n in set(frozen)}

        student = load_pruned(self.student_dir)
        tower, adapter = vision_tower(student)
        self._check_pair(tower, adapter, t_tower, t_adapter, frozen, probe)
        for name in frozen:
            tower.get_parameter(name).requires_grad_(False)
        if self.cfg.grad_checkpointing:
            adapter.set_grad_checkpointing(tower, True)
        model = TokenModel(tower, adapter).train()
        if self.cfg.zero_stage == 3:
            model.register_external_parameters()
        no_decay = getattr(tower, "no_weight_decay", lambda: set())()
        groups = param_groups(model, {f"tower.{n}" for n in no_decay}, self.cfg.weight_decay[0],
                              exempt=self.cfg.decay_exempt)
        schedule = functools.partial(WarmupCosine, total=self.total_steps,
                                     warmup=self.warmup_steps,
                                     floor=self.cfg.min_lr / self.lr,
                                     weight_decay=self.cfg.weight_decay)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=groups, config=self.ds_config, lr_scheduler=schedule)
        self.frozen = frozen

    def _check_pair(self, tower, adapter, t_tower, t_adapter, frozen, probe) -> None:
        t_params = dict(t_tower.named_parameters())
        s_params = dict(tower.named_parameters())
        if set(t_params) != set(s_params):
            diff = sorted(set(t_params) ^ set(s_params))[:4]
            raise DistillError(f"student {self.student_dir} and teacher differ in parameters "
                               f"{diff}: is the student pruned from this teacher?")
        for name in frozen:
            if t_params[name].shape != s_params[name].shape:
                raise DistillError(f"student {self.student_dir}: {name} has shape "
                                   f"{tuple(s_params[name].shape)}, the teacher's "
                                   f"{tuple(t_params[name].shape)}")
        with torch.no_grad():
            s_out = adapter.final_tokens(tower, probe)
            t_out = t_adapter.final_tokens(t_tower, probe.to(self.device, self.dtype))
        for part, s, t in zip(("pooled", "patch tokens"), s_out, t_out):
            if s.shape != t.shape:
                raise DistillError(f"student {part} {tuple(s.shape)} do not match the "
                                   f"teacher's {tuple(t.shape)}")

    def _client_state(self, step: int) -> dict:
        return {"step": step, "world_size": self.world_size,
                "global_batch": self.data.global_batch, "total_steps": self.total_steps,
                "seed": self.seed}

    def _fingerprint(self) -> str:
        """What the training trajectory depends on (not checkpointing or loader options)."""
        cfg = self.cfg.model_dump(exclude={"checkpoint_every", "keep_checkpoints", "workers"})
        return fingerprint(cfg, self.identity, self.seed,
                           read_manifest(self.student_dir)["shapes"])

    def _resume(self) -> int:
        ckpt, marker = self.paths.checkpoints, self.paths.fingerprint
        fingerprint_ = self._fingerprint()
        if marker.is_file() and marker.read_text() != fingerprint_:
            # Another student or schedule: the checkpoints cannot continue this run.
            if self.rank == 0:
                shutil.rmtree(ckpt, ignore_errors=True)
                ckpt.mkdir(parents=True)
                self.paths.log.unlink(missing_ok=True)
            dist.barrier()
        if self.rank == 0:
            atomic_write(marker, fingerprint_)
        if not (ckpt / "latest").is_file():
            if self.rank == 0 and self.paths.log.exists():
                self.paths.log.unlink()
            return 0
        tag = read_tag(ckpt)
        with weights_only_loads(ckpt / tag):
            _, state = self.engine.load_checkpoint(str(ckpt), tag=tag)
        expected = self._client_state(0)
        for key in ("world_size", "global_batch", "total_steps", "seed"):
            if state.get(key) != expected[key]:
                raise DistillError(
                    f"{ckpt}: the checkpoint was written with {key}={state.get(key)}, this run "
                    f"has {expected[key]}; resuming would change the schedule or data order "
                    "(use the same launcher and recipe, or another output_dir)")
        step = int(state["step"])
        if self.rank == 0:  # steps logged after the checkpoint are run again
            kept = [r for r in read_loss_log(self.paths.log) if r["step"] <= step]
            atomic_write(self.paths.log, "".join(json.dumps(r) + "\n" for r in kept))
        return step

    # ---- training ------------------------------------------------------------------------
    def _targets(self, x: torch.Tensor):
        with torch.no_grad():
            return self.teacher(x)

    def train(self) -> list[dict]:
        """Run from the current step to the end; returns this invocation's log records."""
        records: list[dict] = []
        if self.step >= self.total_steps:
            return records
        batches = self.data.batches(self.step)
        start = time.perf_counter()
        steps = range(self.step + 1, self.total_steps + 1)
        for step in progress(steps, f"distill ({self.cfg.loss}, ZeRO-{self.cfg.zero_stage})",
                             enabled=self.progress_bar):
            lr = self.engine.get_lr()[0]
            wd = max(g["weight_decay"] for g in self.engine.optimizer.param_groups)
            total = torch.zeros((), dtype=torch.float64, device=self.device)
            for _ in range(self.cfg.grad_accum):
                epoch, x = next(batches)
                x = x.to(self.device, self.dtype, non_blocking=True)
                loss = self.loss_fn(self.engine(x), self._targets(x))
                self.engine.backward(loss)
                self.engine.step()
                total += loss.detach().double()
            dist.all_reduce(total)
            record = {"step": step, "epoch": epoch,
                      "loss": total.item() / (self.world_size * self.cfg.grad_accum),
                      "lr": lr, "weight_decay": wd,
                      "seconds": round(time.perf_counter() - start, 3)}
            records.append(record)
            if self.rank == 0:
                append_line(self.paths.log, json.dumps(record))
            self.step = step
            if step % self.cfg.checkpoint_every == 0 or step == self.total_steps:
                self.save_checkpoint()
        return records

    def save_checkpoint(self) -> str:
        """DeepSpeed checkpoint of the current step; `latest` moves only once every rank
        has written its shards (DeepSpeed writes it from rank 0 without waiting)."""
        ckpt, tag = self.paths.checkpoints, step_tag(self.step)
        needed = self._checkpoint_bytes()
        room = torch.tensor(float(free_bytes(ckpt) >= needed), device=self.device)
        dist.all_reduce(room, op=dist.ReduceOp.MIN)  # every rank stops, or none
        try:
            if not room.item():
                raise no_space(ckpt, needed, f"the checkpoint {tag}")
            with room_for(ckpt, needed, f"the checkpoint {tag}", check=False):
                self.engine.save_checkpoint(str(ckpt), tag=tag, client_state=self._client_state(
                    self.step), save_latest=False)
        except NoSpaceError:
            if self.rank == 0:  # a partial checkpoint only takes room (`latest` never named it)
                shutil.rmtree(ckpt / tag, ignore_errors=True)
            raise
        dist.barrier()
        if self.rank == 0:
            follow_umask(ckpt)  # DeepSpeed's copies of its recovery scripts are 0744
            atomic_write(ckpt / "latest", tag)
            tags = sorted((p.name for p in ckpt.glob("global_step*") if p.is_dir()),
                          key=tag_step)
            for old in tags[:-self.cfg.keep_checkpoints]:
                shutil.rmtree(ckpt / old, ignore_errors=True)
        dist.barrier()
        return tag

    def _checkpoint_bytes(self) -> int:
        """About the bytes one checkpoint takes: the last one's, or the weights plus an
        fp32 copy and AdamW's two moments (12 bytes) of every trained parameter."""
        tags = sorted((p for p in self.paths.checkpoints.glob("global_step*") if p.is_dir()),
                      key=lambda p: tag_step(p.name))
        if tags:
            return sum(f.stat().st_size for f in tags[-1].rglob("*") if f.is_file())
        params = list(self.engine.module.parameters())
        numel = [getattr(p, "ds_numel", p.numel()) for p in params]  # ZeRO-3: partitioned
        return sum(n * p.element_size() + (12 * n if p.requires_grad else 0)
                   for n, p in zip(numel, params))

    # ---- consolidation -------------------------------------------------------------------
    def consolidate(self) -> Path:
        """One pruned model from the ZeRO shards of the newest checkpoint (rank 0 writes
        it), with the untrained final norm/projection restored from the teacher."""
        out = self.paths.distilled
        if self.rank == 0:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            ckpt = self.paths.checkpoints
            tag = read_tag(ckpt)
            with weights_only_loads(ckpt / tag):
                state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag)
            model = load_pruned(self.student_dir)
            tower, _ = vision_tower(model)
            prefix = "tower."
            tower.load_state_dict({k[len(prefix):]: v for k, v in state.items()}, strict=True)
            with torch.no_grad():  # from the full-precision copy (training ran in self.dtype)
                for name in self.frozen:
                    tower.get_parameter(name).copy_(self.restore[name])
            self.distilled_model = model
            save_pruned(model, out, meta={"distilled": {
                "steps": tag_step(tag), "loss": self.cfg.loss,
                "teacher": str(self.identity.get("teacher", "")),
                "student": str(self.student_dir), "restored": self.frozen}})
        dist.barrier()
        return out

    def _previous_result(self) -> dict:
        """The result.json an earlier run wrote, {} when there is none to read."""
        try:
            data = json.loads(self.paths.result.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def run(self) -> dict:
        t0 = time.perf_counter()
        resumed = self.step or None
        trained_before = self.step >= self.total_steps  # nothing left to train
        self.train()
        if not (self.paths.checkpoints / "latest").is_file() or self.step != tag_step(
                (self.paths.checkpoints / "latest").read_text().strip()):
            self.save_checkpoint()
        self.consolidate()
        log = read_loss_log(self.paths.log) if self.rank == 0 else []
        result = {
            "steps": self.step, "total_steps": self.total_steps, "resumed_from": resumed,
            "first_loss": log[0]["loss"] if log else None,
            "final_loss": log[-1]["loss"] if log else None,
            "loss": self.cfg.loss, "zero_stage": self.cfg.zero_stage,
            "world_size": self.world_size, "global_batch": self.data.global_batch,
            "lr": self.lr, "dtype": str(self.dtype).removeprefix("torch."),
            "untrained_restored": self.frozen,
            "paths": {k: str(v) for k, v in asdict(self.paths).items()},
            "seconds": round(time.perf_counter() - t0, 2),
            "reused": trained_before,
        }
        if trained_before:  # the seconds the training took, not those of this check
            previous = self._previous_result()
            if isinstance(previous.get("seconds"), (int, float)):
                result["seconds"] = previous["seconds"]
        if self.rank == 0:
            atomic_write(self.paths.result, json.dumps(result, indent=2))
        return result
