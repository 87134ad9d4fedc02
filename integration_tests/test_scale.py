"""Data at scale: calibration and validation streamed by DataLoaders (an ImageFolder read by
workers gives the in-memory batches), and a score or prune stage killed with SIGKILL
resumes to the scores, sizes, trace and pruned weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from amp_plugin.config import DataConfig
from amp_plugin.data import amp_loader, batches, get_source
from amp_plugin.data.base import choose_disjoint
from amp_plugin.data.digits import write_digit_images
from amp_plugin.data.imagefolder import image_folder, stack

AMP = shutil.which("amp") or str(Path(sys.executable).with_name("amp"))


def test_imagefolder_streams_the_in_memory_batches(tmp_path: Path) -> None:
    write_digit_images(tmp_path / "train", range(200))
    cfg = DataConfig(kind="imagefolder", root=str(tmp_path / "train"), image_size=32,
                     mean=(0.5,) * 3, std=(0.5,) * 3, calib_images=80, val_images=72,
                     batch_size=32, workers=2)
    # in memory: every chosen image read, stacked and cut into batches
    ds = image_folder(cfg.root, cfg)
    order = choose_disjoint(len(ds), 80, 72, 0, "data.root")
    calib, val = stack(ds, order[:80]), stack(ds, order[80:])
    want_calib = batches(calib.images, 32, False, calib.labels)
    want_val = batches(val.images, 32, True)

    source = get_source("imagefolder")
    calib_set, _ = source.amp_datasets(cfg, 0, extra="labels")
    _, val_set = source.amp_datasets(cfg, 0)
    loader = amp_loader(calib_set, 32, cfg.workers, drop_last=False)
    assert loader.num_workers == 2 and len(loader) == 3
    got = list(loader)
    assert [len(b[0]) for b in got] == [32, 32, 16]
    for (x, y), (wx, wy) in zip(got, want_calib, strict=True):
        assert torch.equal(x, wx) and torch.equal(y, wy)
    got_val = list(amp_loader(val_set, 32, cfg.workers, drop_last=True))
    assert len(got_val) == 2 and all(torch.equal(a, b) for a, b in zip(got_val, want_val))
    # a resumed pass starts at its batch
    rest = list(amp_loader(calib_set, 32, 0, drop_last=False, start_batch=1))
    assert len(rest) == 2 and torch.equal(rest[0][0], want_calib[1][0])


def _recipe(tmp_path: Path, name: str = "kill", model: dict | None = None,
            data: dict | None = None, amp: dict | None = None) -> Path:
    """A score-and-prune recipe on a small random ViT and digits; `model` (the timm
    kwargs), `data` and `amp` override single keys."""
    recipe = {
        "name": name, "seed": 0, "output_dir": str(tmp_path / "runs"),
        "stages": ["score", "prune"],
        "model": {"library": "timm", "name": "vit_small_patch16_224",
                  "kwargs": {"img_size": 32, "patch_size": 4, "embed_dim": 96, "depth": 4,
                             "num_heads": 4, "num_classes": 0, **(model or {})}},
        "data": {"kind": "digits", "image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3,
                 "calib_images": 320, "val_images": 64, "batch_size": 16, **(data or {})},
        "amp": {"criterion": "entropy", "inv_temperature": 20, "threshold": 1e-2,
                "max_steps": 6, "device": "cpu", "checkpoint_every": 3, **(amp or {})},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def _prune(recipe: Path, out: Path, kill_when: Path | None = None) -> str:
    """`amp prune` in a subprocess; with `kill_when`, SIGKILL it as soon as that file
    appears (stopped first, so the test sees the state it was killed in)."""
    log = out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        proc = subprocess.Popen([AMP, "prune", str(recipe), "--out", str(out),
                                 "--no-progress"], env=ENV, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while kill_when is not None and not kill_when.exists():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.005)
        if kill_when is not None:
            proc.send_signal(signal.SIGSTOP)
            proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=600) == (-signal.SIGKILL if kill_when else 0), \
            log.read_text()[-3000:]
    return log.read_text()


def test_killed_score_and_prune_resume_to_the_same_outputs(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path)
    ref, run = tmp_path / "ref", tmp_path / "run"
    _prune(recipe, ref)

    _prune(recipe, run, kill_when=run / "scores.rank0.partial")  # killed while scoring
    assert not (run / "scores.safetensors").exists()
    log = _prune(recipe, run, kill_when=run / "prune.partial.json")  # killed in the search
    assert "score: resumed after" in log
    assert not (run / "prune.json").exists()
    decided = json.loads((run / "prune.partial.json").read_text())["state"]["sizes"]
    assert 1 <= len(decided) < 4
    log = _prune(recipe, run)
    assert f"search resumed after {len(decided)} decided MLPs" in log
    assert not (run / "prune.partial.json").exists()

    s_ref = load_file(str(ref / "scores.safetensors"))
    s_run = load_file(str(run / "scores.safetensors"))
    assert s_ref.keys() == s_run.keys()
    assert all(torch.equal(s_ref[k], s_run[k]) for k in s_ref)
    r_ref = json.loads((ref / "prune.json").read_text())["result"]
    r_run = json.loads((run / "prune.json").read_text())["result"]
    assert r_run["hidden_sizes"] == r_ref["hidden_sizes"]
    assert any(v < 384 for v in r_ref["hidden_sizes"].values())  # the search did prune
    assert r_run["trace"] == r_ref["trace"] and r_run["entropy"] == r_ref["entropy"]
    assert r_run["evaluations"] == r_ref["evaluations"]
    w_ref = load_file(str(ref / "pruned" / "model.safetensors"))
    w_run = load_file(str(run / "pruned" / "model.safetensors"))
    assert w_ref.keys() == w_run.keys()
    assert all(torch.equal(w_ref[k], w_run[k]) for k in w_ref)
