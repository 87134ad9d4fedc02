"""`torchrun --nproc_per_node 2 amp prune RECIPE` (gloo, CPU) gives the scores and hidden
sizes of a 1-process run over the same global batches, with each rank streaming its share
of every batch (DistributedSampler) and caching only its shard of the validation states,
here under a budget that makes the cache checkpointed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import amp_plugin as amp

AMP = shutil.which("amp") or str(Path(sys.executable).with_name("amp"))


def _recipe(tmp_path: Path) -> Path:
    # The same weights on every rank: a local file, as with the real checkpoints.
    torch.manual_seed(0)
    model_cfg = {"library": "timm", "name": "vit_small_patch16_224",
                 "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 3,
                            "num_heads": 4, "num_classes": 0}}
    model = amp.create_model(model_cfg)
    weights = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    recipe = {
        "name": "dist_tiny", "seed": 0, "output_dir": str(tmp_path / "runs"),
        "stages": ["score", "prune"],
        "model": {**model_cfg, "weights": str(weights)},
        "data": {"kind": "digits", "image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3,
                 "calib_images": 96, "val_images": 64, "batch_size": 32},
        "amp": {"criterion": "entropy", "inv_temperature": 20, "threshold": 2e-2,
                "max_steps": 6, "device": "cpu"},
    }
    path = tmp_path / "dist_tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs gloo")
def test_two_processes_equal_one(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    _run([AMP, "prune", str(recipe), "--out", str(one), "--no-progress"], tmp_path)
    # per rank: 32 images x 17 tokens x 64 x 4 bytes = 0.133 MiB per block, 0.398 MiB for 3;
    # the budget holds 2 blocks: one checkpoint and the block being searched
    budget = ["--set", "amp.cache.device_gib=0.00027", "--set", "amp.cache.host_gib=0",
              "--set", "amp.cache.disk_gib=0"]
    log = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                "2", AMP, "prune", str(recipe), "--out", str(two), "--no-progress", *budget],
               tmp_path)

    s1, s2 = load_file(str(one / "scores.safetensors")), load_file(str(two / "scores.safetensors"))
    assert s1.keys() == s2.keys() and len(s1) == 3
    for name in s1:
        assert s1[name].shape == (256,)
        torch.testing.assert_close(s2[name], s1[name], rtol=1e-4, atol=1e-8)

    r1 = json.loads((one / "prune.json").read_text())["result"]
    r2 = json.loads((two / "prune.json").read_text())["result"]
    assert r2["hidden_sizes"] == r1["hidden_sizes"]
    assert any(v < 256 for v in r1["hidden_sizes"].values())  # the search did prune
    assert [t["size"] for t in r2["trace"]] == [t["size"] for t in r1["trace"]]
    assert r1["cache"].startswith("full") and r2["cache"].startswith("checkpointed at blocks [0]")
    assert r2["extra"]["cache_bytes"] == {"full": 417792, "peak": 278528}  # one rank's shard
    assert r1["extra"]["cache_bytes"]["full"] == 2 * 417792
    for key in ("before", "after"):
        assert r2["entropy"][key] == pytest.approx(r1["entropy"][key], rel=1e-5)

    # one process group: only rank 0 logs and writes
    assert log.count("score: 3 MLPs") == 1, log[-2000:]
    # only rank 0 wrote, and the pruned model it wrote has the searched sizes
    pruned = amp.load_pruned(two / "pruned")
    sizes = {n: v.hidden for n, v in amp.find_mlps(pruned).items()}
    assert sizes == r1["hidden_sizes"]
