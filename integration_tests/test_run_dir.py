"""The run directory under hostile conditions: symbolic links out of it, file modes, a
read-only or full file system. A run writes only inside its directory, with the user's
umask, and refuses or stops with a message naming the directory; completed stages stay.
Real runs of a tiny ViT on the digits, real files, real processes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from amp_cli.app import app
from typer.testing import CliRunner

import amp_plugin as amp
from amp_plugin.run.layout import RunDirError
from amp_plugin.run.recipe import load_recipe
from amp_plugin.utils.io import atomic_dir, atomic_write
from amp_plugin.utils.lock import FolderLock, LockedError

SPEC = {"library": "timm", "name": "vit_small_patch16_224", "kwargs": {
    "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
    "num_classes": 0}}
DATA = {"kind": "digits", "image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3,
        "calib_images": 64, "val_images": 64, "batch_size": 32, "workers": 0}
ALL = ["score", "prune", "distill", "eval", "report"]


def recipe(tmp: Path, run: Path, name: str = "r", **sections) -> Path:
    data = {"name": name, "seed": 0, "output_dir": str(run), "stages": ALL,
            "model": SPEC, "data": DATA, "amp": {"threshold": 2e-3, "max_steps": 3},
            "distill": {"max_steps": 2, "batch_size": 16, "workers": 0, "checkpoint_every": 1},
            "eval": {"tasks": ["knn"]}, **sections}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def digest(folder: Path) -> dict[str, str]:
    """Every entry below `folder` (links not followed): file contents, link targets, modes."""
    out = {}
    for p in sorted(folder.rglob("*")):
        key = str(p.relative_to(folder))
        if p.is_symlink():
            out[key] = "link " + os.readlink(p)
        elif p.is_file():
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest() + oct(p.stat().st_mode)
        else:
            out[key] = "dir " + oct(p.stat().st_mode)
    return out


UMASK = 0o027  # not the usual 022: modes that only a umask gives


@pytest.fixture(scope="module")
def done(tmp_path_factory) -> tuple[Path, Path]:
    """(recipe, run directory) of a completed run of every stage, under umask 027."""
    tmp = tmp_path_factory.mktemp("done")
    r = recipe(tmp, tmp / "run")
    old = os.umask(UMASK)
    try:
        amp.run(load_recipe(r), tmp / "run", show_progress=False)
    finally:
        os.umask(old)
    return r, tmp / "run"


# ---- file modes -------------------------------------------------------------------------
def test_every_file_of_a_run_follows_the_umask(done):
    """Every folder and file a run of all stages writes (the saved models, written by
    safetensors, and DeepSpeed's checkpoints and scripts included) has the mode a plain
    open or mkdir gives under the umask: 0750 folders, 0640 files, 0750 scripts."""
    _, run = done
    modes = {str(p.relative_to(run)): p.stat().st_mode & 0o777 for p in run.rglob("*")}
    assert {"pruned/model.safetensors", "distilled/model.safetensors", "report.json",
            "distill/checkpoints/global_step2/mp_rank_00_model_states.pt",
            ".lock"} <= set(modes)
    scripts = {k for k in modes if k.endswith(".py")}
    assert scripts and all(k.startswith("distill/checkpoints/") for k in scripts)
    expected = {k: 0o750 if (run / k).is_dir() or k in scripts else 0o640 for k in modes}
    assert modes == expected


# ---- symbolic links never carry a write or a deletion out of the run directory ------------
FILES = ["recipe.yaml", "scores.safetensors", "scores.json", "scores.rank0.partial",
         "prune.json", "prune.partial.json", "eval.json", "report.json", ".hashes.json",
         ".lock", "distill/loss.jsonl", "distill/result.json", "distill/fingerprint",
         "distill/checkpoints/latest", "plots/hidden_sizes.png"]
FOLDERS = ["pruned", "distilled", "distill", "distill/checkpoints",
           "distill/checkpoints/global_step2", "plots", "classifiers"]


def plant(run: Path, rel: str, outside: Path) -> Path:
    """Replace run/rel by a link to a copy of it (or a new file / folder) in `outside`."""
    target = outside / rel.replace("/", "_")
    src = run / rel
    if rel in FOLDERS:
        if src.is_dir():
            shutil.copytree(src, target)
            shutil.rmtree(src)
        else:
            (target / "keep").mkdir(parents=True)
            (target / "keep" / "data.bin").write_bytes(b"precious")
    else:
        if src.is_file():
            shutil.copyfile(src, target)
            src.unlink()
        else:
            target.write_bytes(b"precious")
    src.parent.mkdir(parents=True, exist_ok=True)
    src.symlink_to(target, target_is_directory=rel in FOLDERS)
    return target


@pytest.mark.parametrize("rel", FILES + FOLDERS)
def test_a_link_out_of_the_run_directory_is_refused_before_any_work(done, tmp_path, rel):
    r, original = done
    run, outside = tmp_path / "run", tmp_path / "outside"
    shutil.copytree(original, run, symlinks=True)
    outside.mkdir()
    target = plant(run, rel, outside)
    before_out, before_run = digest(outside), digest(run)
    out = cli("run", r, "--out", run, "--no-progress")
    assert out.exit_code == 2, out.output
    message = " ".join(out.output.split())
    assert f"{run / rel} is a symbolic link to {target}" in message
    assert f"a run writes only inside its run directory {run}" in message
    assert digest(outside) == before_out  # nothing written or deleted out there
    assert digest(run) == before_run  # refused before any work: nothing written here either


def test_a_link_planted_during_a_run_is_refused_when_its_path_is_taken(done, tmp_path):
    """The layout checks a path each time a stage takes it: a link made after the start
    check (here between the score and prune stages) is refused too."""
    r, _ = done
    run, outside = tmp_path / "run", tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("precious")
    job = amp.Run(load_recipe(r), run, show_progress=False)
    try:
        job.start(["score", "prune"])
        job.stage_score()
        (run / "pruned").symlink_to(outside, target_is_directory=True)
        with pytest.raises(RunDirError, match=f"{run / 'pruned'} is a symbolic link to "
                                              f"{outside}"):
            job.stage_prune()
    finally:
        job.close()
    assert digest(outside) == {"keep": digest(outside)["keep"]}
    assert (outside / "keep").read_text() == "precious"


def test_links_at_the_lowest_level_are_replaced_never_followed(tmp_path):
    """Below the layout, the writers themselves never write through a link: a file or a
    folder written atomically replaces a link at its path; a log line is never appended
    through one; the lock file is never opened through one."""
    from amp_plugin.utils.io import append_line

    outside = tmp_path / "outside"
    (outside / "d").mkdir(parents=True)
    (outside / "f").write_text("precious")
    (outside / "d" / "x").write_text("precious")
    before = digest(outside)
    run = tmp_path / "run"
    run.mkdir()
    (run / "f").symlink_to(outside / "f")
    (run / "d").symlink_to(outside / "d", target_is_directory=True)
    (run / "log").symlink_to(outside / "f")
    (run / ".lock").symlink_to(outside / "f")
    atomic_write(run / "f", "new")
    atomic_dir(run / "d", lambda t: (t / "y").write_text("new"))
    with pytest.raises(OSError):
        append_line(run / "log", "new")
    with pytest.raises(LockedError, match=f"{run / '.lock'} is a symbolic link to"):
        FolderLock(run / ".lock").acquire()
    assert digest(outside) == before
    assert not (run / "f").is_symlink() and (run / "f").read_text() == "new"
    assert not (run / "d").is_symlink() and [p.name for p in (run / "d").iterdir()] == ["y"]


def test_the_run_directory_itself_may_be_a_link(done, tmp_path):
    r, original = done
    real = tmp_path / "elsewhere" / "run"
    shutil.copytree(original, real, symlinks=True)
    (tmp_path / "run").symlink_to(real, target_is_directory=True)
    out = cli("run", r, "--out", tmp_path / "run", "--no-progress", "--stage", "score",
              "--stage", "prune", "--stage", "report")
    assert out.exit_code == 0, out.output
    assert "score: kept from an earlier run" in out.output
    assert json.loads((real / "report.json").read_text())["hidden_sizes"] == json.loads(
        (original / "report.json").read_text())["hidden_sizes"]


def test_an_amp_process_refuses_a_linked_checkpoint_folder(done, tmp_path):
    """`amp run` in its own process: a checkpoint folder linked out of the run directory
    (where DeepSpeed would write its shards and the retention would delete old ones)."""
    r, original = done
    run, outside = tmp_path / "run", tmp_path / "outside"
    shutil.copytree(original, run, symlinks=True)
    outside.mkdir()
    target = plant(run, "distill/checkpoints", outside)
    before = digest(outside)
    out = subprocess.run([sys.executable, "-m", "amp_cli.app", "run", str(r), "--out", str(run),
                          "--no-progress", "--set", "distill.max_steps=4"],
                         capture_output=True, text=True)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"{run / 'distill/checkpoints'} is a symbolic link to {target}" in " ".join(
        out.stderr.split())
    assert digest(outside) == before
