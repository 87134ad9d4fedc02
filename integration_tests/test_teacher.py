"""The demo's committed teacher: small, found by the train stage, and reproduced by the
project's own training script."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

import amp_plugin as amp
from amp_plugin.core.serialization import is_pruned_dir, read_manifest
from amp_plugin.data import get_source
from amp_plugin.data.digits import digits_splits
from amp_plugin.evaluate.features import extract_features, knn_top1
from amp_plugin.run.recipe import RECIPES_DIR
from amp_plugin.run.teacher import saved_fingerprint, teacher_fingerprint


def _knn(model, data) -> float:
    split = digits_splits(data, 0)
    tr, te = split["train"], split["test"]
    return knn_top1(extract_features(model, tr.images, show_progress=False), tr.labels,
                    extract_features(model, te.images, show_progress=False), te.labels)


# the demo teacher's whole training (minutes on a 2-core CPU): `make test-slow`; one epoch
# of the same training runs in make test (test_runs_never_write_the_committed_teacher)
@pytest.mark.slow
def test_training_script_reproduces_the_committed_teacher(tmp_path):
    recipe = amp.load_recipe("demo_digits")
    committed = RECIPES_DIR.parent / recipe.train.checkpoint
    assert is_pruned_dir(committed)
    assert (committed / "model.safetensors").stat().st_size < 2 << 20
    # the recipe as shipped finds the committed teacher and does not train
    log = io.StringIO()
    amp.run(recipe, tmp_path / "cached", stages=["train"], show_progress=False,
            console=Console(file=log, width=200))
    assert f"teacher: cached at {recipe.train.checkpoint}" in log.getvalue()
    # the training script, with the recipe's settings, gives a teacher of the same quality
    # (no saved teacher given: it trains one into the run directory)
    fresh = amp.load_recipe("demo_digits", {"train.checkpoint": None})
    amp.run(fresh, tmp_path / "run", stages=["train"], show_progress=False)
    expected = _knn(amp.load_pruned(committed), recipe.data)
    assert _knn(amp.load_pruned(tmp_path / "run" / "teacher"), recipe.data) == pytest.approx(
        expected, abs=1.0)
    assert expected > 90


# ---- the committed teacher is read-only input -------------------------------------------
REPO = RECIPES_DIR.parent
COMMITTED = RECIPES_DIR / "teachers" / "demo_digits"
SMALL = ["--set", "data.calib_images=128", "--set", "data.val_images=128",
         "--set", "data.batch_size=64", "--set", "amp.max_steps=3", "--no-progress"]


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def _git_status(*paths: str) -> str | None:
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--",
                          *paths], cwd=REPO, capture_output=True, text=True)
    return out.stdout if out.returncode == 0 else None


def _amp(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "amp_cli.app", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "COLUMNS": "400"})  # log lines unwrapped


def test_runs_never_write_the_committed_teacher(tmp_path):
    """Another seed draws other images from the committed teacher (no training); another
    train setting trains a teacher into the run directory, which later stages use; the
    repository is left as it was."""
    hashes, before = _hashes(COMMITTED), _git_status()
    seed1 = _amp("run", "--out", tmp_path / "seed1", "--set", "seed=1", "--stage", "train",
                 *SMALL, cwd=tmp_path)
    assert seed1.returncode == 0, seed1.stderr[-3000:]
    assert "teacher: cached at" in seed1.stdout and "trained" not in seed1.stdout
    assert not (tmp_path / "seed1" / "teacher").exists()

    run = tmp_path / "epochs1"
    epochs1 = _amp("run", "--out", run, "--set", "train.epochs=1", "--stage", "train",
                   "--stage", "score", "--stage", "prune", *SMALL, cwd=tmp_path)
    assert epochs1.returncode == 0, epochs1.stderr[-3000:]
    assert f"saved to {run / 'teacher'}" in epochs1.stdout
    recipe = amp.load_recipe("demo_digits", {"train.epochs": 1})
    assert saved_fingerprint(run / "teacher") == teacher_fingerprint(recipe)
    assert saved_fingerprint(COMMITTED) != teacher_fingerprint(recipe)
    # the prune stage pruned the run's teacher, not the committed one
    assert read_manifest(run / "pruned")["meta"]["source"] == str(run / "teacher")

    assert _hashes(COMMITTED) == hashes
    assert _git_status() == before
    if before is not None:  # a git checkout (an installed package has no status)
        assert _git_status(str(COMMITTED)) == ""

    # a later process without the train stage uses the run's teacher, and refuses one
    # trained with other settings rather than scoring it
    again = _amp("run", "--out", run, "--set", "train.epochs=1", "--stage", "score", *SMALL,
                 cwd=tmp_path)
    assert again.returncode == 0 and "score: kept from an earlier run" in again.stdout
    other = _amp("run", "--out", run, "--set", "train.epochs=2", "--stage", "score", *SMALL,
                 cwd=tmp_path)
    assert other.returncode == 2
    message = " ".join(other.stderr.split())
    assert f"{run / 'teacher'} was trained with other settings" in message
    assert "run the train stage first" in message


def test_the_seed_draws_images_and_train_seed_trains_the_teacher():
    """`seed` moves the calibration / validation draw, not the teacher nor its test split;
    train.seed is the teacher's (and its digits split's)."""
    base = amp.load_recipe("demo_digits")
    other = amp.load_recipe("demo_digits", {"seed": 3})
    assert teacher_fingerprint(other) == teacher_fingerprint(base) == (
        saved_fingerprint(COMMITTED))
    source = get_source("digits")
    test = digits_splits(other.data, other.seed)["test"]
    assert torch.equal(test.images, digits_splits(base.data, base.seed)["test"].images)
    calib0 = source.amp_datasets(base.data, base.seed)[0]
    calib3 = source.amp_datasets(other.data, other.seed)[0]
    assert not torch.equal(calib0[0][0], calib3[0][0])
    reseeded = amp.load_recipe("demo_digits", {"train.seed": 1})
    assert reseeded.data.split_seed == 1
    assert teacher_fingerprint(reseeded) != teacher_fingerprint(base)
    assert not torch.equal(digits_splits(reseeded.data, 0)["test"].images, test.images)
