"""Distillation on DeepSpeed: losses, schedule, data order, the recipe section, a
single-process run without a launcher, and the real deepspeed launcher with ZeRO-3 on two
gloo ranks (kill after a checkpoint, resume, consolidate)."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file

import amp_plugin as amp
from amp_plugin.config import DataConfig, DistillConfig
from amp_plugin.core.mlp import find_mlps
from amp_plugin.data import digits_splits, get_source
from amp_plugin.distill import (
    DistillError,
    WarmupCosine,
    kl_entropy_loss,
    param_groups,
    read_loss_log,
    token_mse_loss,
)
from amp_plugin.distill.data import distill_data
from amp_plugin.distill.token_model import untrained_parameters
from amp_plugin.run import Run
from amp_plugin.run.recipe import RecipeError, load_recipe

VIT = {"library": "timm", "name": "vit_small_patch16_224",
       "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2,
                  "num_heads": 4, "num_classes": 0}}
DATA = {"kind": "digits", "image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3,
        "workers": 0}
SCRIPT = Path(__file__).parent / "scripts" / "distill_zero3.py"
BIN = Path(sys.executable).parent


# ---- fixtures ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A teacher and a student pruned from it to half of every MLP with Torch-Pruning,
    its MLPs then perturbed so that the distillation has a gap to close."""
    root = tmp_path_factory.mktemp("distill_models")
    torch.manual_seed(0)
    teacher = amp.create_model(VIT).eval()
    amp.save_pruned(teacher, root / "teacher")
    student = amp.load_pruned(root / "teacher")
    keep = {n: torch.arange(0, v.hidden, 2) for n, v in find_mlps(student).items()}
    amp.prune_mlps(student, torch.randn(2, 3, 32, 32), keep)
    with torch.no_grad():
        for view in find_mlps(student).values():
            view.output.weight.mul_(3.0)
    amp.save_pruned(student, root / "student")
    return {"teacher": root / "teacher", "student": root / "student"}


def write_recipe(path: Path, run_dir: Path, models: dict, **distill) -> Path:
    section = {"teacher": str(models["teacher"]), "student": str(models["student"]),
               "batch_size": 16, "base_lr": 0.05, "min_lr": 1e-5, "warmup_epochs": 0.05,
               "min_crop": 1.0, "dtype": "float32", **distill}
    recipe = {"name": "distill_test", "seed": 0, "output_dir": str(run_dir),
              "stages": ["distill"], "model": VIT, "data": DATA, "distill": section}
    path.write_text(yaml.safe_dump(recipe))
    return path


def tower_tokens(model: torch.nn.Module, x: torch.Tensor):
    tower, adapter = amp.vision_tower(model)
    with torch.no_grad():
        return adapter.final_tokens(tower, x)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- pure functions ----------------------------------------------------------------------
def test_losses_match_direct_computation():
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(6, 8, generator=g), torch.randn(6, 5, 8, generator=g))
    t = (torch.randn(6, 8, generator=g), torch.randn(6, 5, 8, generator=g))

    mse = ((s[0] - t[0]) ** 2).sum() / s[0].numel() + ((s[1] - t[1]) ** 2).sum() / s[1].numel()
    assert torch.allclose(token_mse_loss(s, t), mse, atol=1e-6)

    def probs(f, k):
        n = f / f.norm(dim=1, keepdim=True)
        e = torch.exp(k * n @ n.t())
        return e / e.sum(dim=1, keepdim=True)

    ps, pt = probs(s[0], 7.0), probs(t[0], 7.0)
    kl_ts = sum(pt[i, j] * math.log(pt[i, j] / ps[i, j]) for i in range(6) for j in range(6))
    kl_st = sum(ps[i, j] * math.log(ps[i, j] / pt[i, j]) for i in range(6) for j in range(6))
    expected = 0.5 * (kl_ts + kl_st) / 6
    assert kl_entropy_loss(s, t, 7.0).item() == pytest.approx(float(expected), rel=1e-5)
    assert kl_entropy_loss(t, t, 7.0).item() == pytest.approx(0.0, abs=1e-7)


def test_weight_decay_on_every_parameter_unless_exempt():
    """The authors decay every parameter; `decay_exempt` keeps timm's split (no decay on
    biases, norms and the embeddings a model names)."""
    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32,
                              patch_size=8, embed_dim=64, depth=1, num_heads=2, num_classes=0)
    model.blocks[0].norm1.requires_grad_(False)  # frozen parameters are never optimized
    trainable = [p for p in model.parameters() if p.requires_grad]
    [every] = param_groups(model, set(), 0.04)
    assert every["decay"] and every["weight_decay"] == 0.04
    assert [id(p) for p in every["params"]] == [id(p) for p in trainable]
    split = param_groups(model, {"pos_embed", "cls_token"}, 0.04, exempt=True)
    decayed = {id(p) for g in split if g["decay"] for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[i] for i in decayed} == {n for n, p in model.named_parameters()
                                           if p.requires_grad and p.ndim > 1
                                           and n not in ("pos_embed", "cls_token")}
    assert sum(len(g["params"]) for g in split) == len(trainable)
    assert all(g["weight_decay"] == (0.04 if g["decay"] else 0.0) for g in split)


def test_schedule_lr_and_weight_decay():
    w, b = torch.nn.Parameter(torch.ones(3, 3)), torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([{"params": [w], "weight_decay": 0.04, "decay": True},
                             {"params": [b], "weight_decay": 0.0, "decay": False}], lr=1e-3)
    total, warmup, floor = 20, 4, 0.1
    sched = WarmupCosine(opt, total=total, warmup=warmup, floor=floor, weight_decay=(0.04, 0.2))
    for step in range(total):
        if step < warmup:
            lr = 1e-3 * (step + 1) / warmup
        else:
            p = (step - warmup) / (total - warmup)
            lr = 1e-3 * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))
        wd = 0.2 + (0.04 - 0.2) * 0.5 * (1 + math.cos(math.pi * step / total))
        assert opt.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-9)
        assert opt.param_groups[1]["lr"] == pytest.approx(lr, rel=1e-9)
        assert opt.param_groups[0]["weight_decay"] == pytest.approx(wd, rel=1e-9)
        assert opt.param_groups[1]["weight_decay"] == 0.0
        opt.step()
        sched.step()
    state = sched.state_dict()
    again = WarmupCosine(opt, total=total, warmup=warmup, floor=floor, weight_decay=(0.04, 0.2))
    again.load_state_dict(state)
    assert again.last_epoch == total


def test_data_order_resumes_and_shards():
    cfg = DataConfig(**DATA)
    images, tensor_input = get_source("digits").train_images(cfg, 0)
    make = lambda rank: distill_data(images, tensor_input, cfg.image_size, cfg.mean,  # noqa: E731
                                     cfg.std, 0, 0.5, micro_batch=32, grad_accum=2,
                                     world_size=2, rank=rank, workers=0)
    data = make(0)
    per_epoch = data.steps_per_epoch  # 1348 train images / 2 ranks / 32 / 2
    assert per_epoch == 1348 // 2 // 32 // 2 and data.global_batch == 128
    it = data.batches(0)
    run = [next(it) for _ in range(2 * (per_epoch + 3))]  # crosses an epoch boundary
    resume_at = per_epoch + 1
    it = make(0).batches(resume_at)
    for epoch_batch in run[2 * resume_at:]:
        epoch, batch = next(it)
        assert epoch == epoch_batch[0] and torch.equal(batch, epoch_batch[1])
    assert run[0][1].shape == (32, 3, 32, 32)
    keys0 = set(i for i, _ in make(0)._epoch_keys(0))
    keys1 = set(i for i, _ in make(1)._epoch_keys(0))
    assert not keys0 & keys1 and len(keys0) == len(keys1) == 674
    assert not torch.equal(run[0][1], run[2 * per_epoch][1])  # a new order each epoch


def test_untrained_parameters_are_the_final_norm_and_projection():
    torch.manual_seed(0)
    vit = amp.create_model(VIT).eval()
    tower, adapter = amp.vision_tower(vit)
    x = torch.randn(1, 3, 32, 32)
    assert untrained_parameters(tower, adapter, x) == ["norm.weight", "norm.bias"]
    clip = amp.create_model({"library": "open_clip", "name": "ViT-B-32"}).eval()
    clip.visual.transformer.resblocks = clip.visual.transformer.resblocks[:1]
    tower, adapter = amp.vision_tower(clip)
    frozen = untrained_parameters(tower, adapter, torch.randn(1, 3, 224, 224))
    assert sorted(frozen) == ["ln_post.bias", "ln_post.weight", "proj"]


# ---- the recipe section ------------------------------------------------------------------
def test_recipe_section_errors_name_the_key(tmp_path, models):
    good = write_recipe(tmp_path / "r.yaml", tmp_path / "run", models)
    assert load_recipe(good).distill.batch_size == 16

    def error(**distill) -> str:
        path = write_recipe(tmp_path / "bad.yaml", tmp_path / "run", models, **distill)
        with pytest.raises(RecipeError) as e:
            load_recipe(path)
        return str(e.value)

    assert "distill.warmup" in error(warmup=3)
    assert "distill.zero_stage" in error(zero_stage=4)
    assert "distill.offload_optimizer" in error(offload_optimizer={"device": "gpu"})
    assert "offload_param needs zero_stage 3" in error(offload_param={"device": "cpu"})
    assert "distill.teacher" in error(teacher=str(tmp_path / "absent"))
    assert DistillConfig(offload_optimizer={"device": "cpu"}).offload_optimizer["device"] == "cpu"


def test_missing_student_is_reported_before_any_work(tmp_path, models):
    path = write_recipe(tmp_path / "r.yaml", tmp_path / "run", models, student=None)
    with pytest.raises(DistillError, match="prune stage's output.*pruned"):
        Run(load_recipe(path), tmp_path / "run").execute(["distill"])
    assert not (tmp_path / "run").exists()


# ---- runs --------------------------------------------------------------------------------
def test_single_process_without_launcher_kl_entropy(tmp_path, models):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", run, models, loss="kl_entropy",
                          inv_temperature=10.0, zero_stage=2, max_steps=12, base_lr=0.005,
                          grad_checkpointing=True)
    proc = subprocess.run([str(BIN / "amp"), "distill", str(recipe), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if not torch.cuda.is_available():  # no CUDA or accelerator notice a CPU user cannot act on
        for notice in ("Setting accelerator to CPU", "No CUDA runtime is found",
                       "built successfully"):
            assert notice not in proc.stdout + proc.stderr, notice
    result = json.loads((run / "distill" / "result.json").read_text())
    assert result["steps"] == 12 and result["world_size"] == 1 and result["loss"] == "kl_entropy"
    assert result["reused"] is False and result["seconds"] > 0
    assert result["global_batch"] == 16 and result["lr"] == pytest.approx(0.005 * 16 / 256)
    log = read_loss_log(run / "distill" / "loss.jsonl")
    assert [r["step"] for r in log] == list(range(1, 13))

    distilled = amp.load_pruned(run / "distilled")
    student, teacher = amp.load_pruned(models["student"]), amp.load_pruned(models["teacher"])
    assert ({n: v.hidden for n, v in find_mlps(distilled).items()}
            == {n: v.hidden for n, v in find_mlps(student).items()})
    assert torch.equal(distilled.norm.weight, teacher.norm.weight)
    assert not torch.equal(distilled.blocks[1].mlp.fc2.weight, student.blocks[1].mlp.fc2.weight)
    # The loss of the distilled model, recomputed here on 256 images, is below the student's.
    x = digits_splits(DataConfig(**DATA), 0)["train"].images[:256]
    t = tower_tokens(teacher, x)
    assert (kl_entropy_loss(tower_tokens(distilled, x), t, 10.0)
            < 0.5 * kl_entropy_loss(tower_tokens(student, x), t, 10.0))

    # run again: nothing left to train; the result keeps the seconds the training took
    again = subprocess.run([str(BIN / "amp"), "distill", str(recipe), "--no-progress"],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    kept = json.loads((run / "distill" / "result.json").read_text())
    assert kept["reused"] is True and kept["resumed_from"] == 12
    assert kept["seconds"] == result["seconds"]


def _launch(args: list[str], log: Path) -> subprocess.Popen:
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), *args]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def test_deepspeed_launcher_zero3_kill_resume_consolidate(tmp_path, models):
    run = tmp_path / "run"
    # Persistence threshold 0: every parameter is partitioned, including the class token
    # and position embedding that the adapter reads outside their owner's forward.
    recipe = write_recipe(tmp_path / "r.yaml", run, models, zero_stage=3, max_steps=24,
                          batch_size=8, checkpoint_every=4, keep_checkpoints=2,
                          deepspeed={"zero_optimization":
                                     {"stage3_param_persistence_threshold": 0}})
    log_path, latest = run / "distill" / "loss.jsonl", run / "distill" / "checkpoints" / "latest"

    # 1) `amp distill` under the launcher, killed (SIGKILL, all ranks) after a checkpoint.
    first = _launch([str(BIN / "amp"), "distill", str(recipe), "--no-progress"],
                    tmp_path / "first.log")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and first.poll() is None:
        steps = [r["step"] for r in read_loss_log(log_path)] if log_path.is_file() else []
        if latest.is_file() and steps and steps[-1] >= 6:
            os.killpg(first.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    before = {r["step"]: r for r in read_loss_log(log_path)}
    ckpt_step = int(latest.read_text().removeprefix("global_step"))
    assert 4 <= ckpt_step < max(before) < 24

    # 2) The same run again: resumes from the checkpoint, finishes, consolidates; the
    # script also keeps the outputs of the trained in-memory ZeRO-3 student.
    out = tmp_path / "in_memory.safetensors"
    second = _launch([str(SCRIPT), str(recipe), str(run), str(out)], tmp_path / "second.log")
    assert second.wait(timeout=400) == 0, (tmp_path / "second.log").read_text()[-4000:]

    log = read_loss_log(log_path)
    assert [r["step"] for r in log] == list(range(1, 25))
    for r in log:  # steps run again after the kill repeat the first run exactly
        if r["step"] in before:
            assert r["loss"] == pytest.approx(before[r["step"]]["loss"], rel=1e-5)
            assert r["lr"] == pytest.approx(before[r["step"]]["lr"], rel=1e-12)
    assert any(s > ckpt_step for s in before)  # at least one step was compared after resume
    losses = [r["loss"] for r in log]
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0]
    result = json.loads((run / "distill" / "result.json").read_text())
    assert result["resumed_from"] == ckpt_step and result["world_size"] == 2
    assert result["global_batch"] == 16 and result["zero_stage"] == 3
    tags = sorted(p.name for p in (run / "distill" / "checkpoints").glob("global_step*"))
    assert tags == ["global_step20", "global_step24"]

    # 3) The consolidated model equals the in-memory student, final norm restored.
    memory = load_file(str(out))
    assert int(memory["steps"]) == 24
    distilled = amp.load_pruned(run / "distilled")
    x = digits_splits(DataConfig(**DATA), 0)["test"].images[:8]
    pooled, patch = tower_tokens(distilled, x)
    assert torch.allclose(pooled, memory["pooled"], atol=1e-5, rtol=1e-5)
    assert torch.allclose(patch, memory["patch"], atol=1e-5, rtol=1e-5)
    teacher = amp.load_pruned(models["teacher"])
    assert torch.equal(distilled.norm.bias, teacher.norm.bias)
    t = tower_tokens(teacher, x)
    student = amp.load_pruned(models["student"])
    assert token_mse_loss((pooled, patch), t) < 0.5 * token_mse_loss(tower_tokens(student, x), t)
