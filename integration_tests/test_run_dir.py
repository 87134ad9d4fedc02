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


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment without the one-rank group an in-process distillation
    set up (a child would try to listen on the same port)."""
    group = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    return {**{k: v for k, v in os.environ.items() if k not in group}, **extra}


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
                         capture_output=True, text=True, env=child_env())
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"{run / 'distill/checkpoints'} is a symbolic link to {target}" in " ".join(
        out.stderr.split())
    assert digest(outside) == before


# ---- read-only and full file systems ---------------------------------------------------------
@pytest.fixture
def tmpfs(tmp_path):
    """mount(folder, options): a real tmpfs at `folder` (None where this process may not
    mount one); unmounted after the test."""
    mounted = []

    def mount(folder: Path, options: str) -> Path | None:
        folder.mkdir(parents=True, exist_ok=True)
        if shutil.which("mount") is None or subprocess.run(
                ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                capture_output=True).returncode != 0:
            return None
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def _read_only_copy(original: Path, tmp_path: Path, tmpfs) -> Path:
    """A copy of a run directory on a read-only file system (a tmpfs remounted read-only),
    or, where no tmpfs can be mounted, in folders without write permission (which bind
    every user but root)."""
    fs = tmpfs(tmp_path / "fs", "size=64m")
    if fs is not None:
        shutil.copytree(original, fs / "run", symlinks=True)
        assert subprocess.run(["mount", "-o", "remount,ro", str(fs)]).returncode == 0
        return fs / "run"
    if os.geteuid() == 0:
        pytest.skip("no tmpfs can be mounted here, and permissions do not bind root")
    run = tmp_path / "fs" / "run"
    shutil.copytree(original, run, symlinks=True)
    for p in [run.parent, run, *run.rglob("*")]:
        if p.is_dir():
            p.chmod(0o555)
    return run


def test_a_read_only_run_directory_is_refused_before_any_work(done, tmp_path, tmpfs):
    r, original = done
    run = _read_only_copy(original, tmp_path, tmpfs)
    before = digest(run)
    out = cli("run", r, "--out", run, "--no-progress")
    assert out.exit_code == 2, out.output
    assert f"run directory {run}: {run} is read-only for this process" in " ".join(
        out.output.split())
    assert "stage" not in out.output  # no stage began
    # a run directory still to be made, in a read-only folder
    out = cli("run", r, "--out", run.parent / "new" / "run", "--no-progress")
    assert out.exit_code == 2, out.output
    assert f"run directory {run.parent / 'new' / 'run'}: {run.parent} is read-only" in " ".join(
        out.output.split())
    assert digest(run) == before


def _fill(fs: Path, leave: int) -> Path:
    """A file taking all the room of `fs` but `leave` bytes."""
    filler = fs / "filler"
    with open(filler, "wb") as f:
        f.truncate(0)
        block = b"\1" * (1 << 20)
        left = shutil.disk_usage(fs).free - leave
        while left > 0:
            left -= f.write(block[:min(left, len(block))])
    return filler


def outputs(run: Path) -> dict[str, str]:
    """The stage outputs of a run directory, by content (not the lock, the hash cache or
    the modes)."""
    return {k: v.rsplit("0o", 1)[0] for k, v in digest(run).items() if not k.startswith(".")}


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _same_weights(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert set(wa) == set(wb)
    assert all(wa[k].equal(wb[k]) for k in wa)


def test_a_full_disk_stops_prune_and_distill_naming_the_directory(done, tmp_path, tmpfs):
    """A run directory on a 4 MiB tmpfs: filled up before the pruned model is saved, and
    again before the first distillation checkpoint. Each time: exit 2 naming the folder
    and the bytes needed, every completed output kept, no partial file left; once room is
    made, a rerun finishes with the outputs of an uninterrupted run."""
    r, ref = done
    fs = tmpfs(tmp_path / "fs", "size=4m")
    if fs is None:
        pytest.skip("no tmpfs can be mounted here (the file size limit stand-in below runs)")
    run = fs / "run"
    out = cli("run", r, "--out", run, "--stage", "score", "--no-progress")
    assert out.exit_code == 0, out.output
    kept = outputs(run)

    model_bytes = _size(ref / "pruned")
    filler = _fill(fs, model_bytes // 2)
    out = cli("run", r, "--out", run, "--stage", "score", "--stage", "prune", "--no-progress")
    assert out.exit_code == 2, out.output
    text = " ".join(out.output.split())
    assert f"{run}: cannot write pruned/: no space left on device (about " in text
    needed = int(text.split("(about ")[1].split(" bytes needed")[0].replace(",", ""))
    assert 0.9 * model_bytes < needed <= model_bytes  # weights and manifest, no header
    assert "what was written before is kept" in text
    assert {k: v for k, v in outputs(run).items() if k in kept} == kept  # the scores stay
    assert not any(p.name.startswith(".pruned") for p in run.iterdir())  # no partial copy
    filler.unlink()
    out = cli("run", r, "--out", run, "--stage", "score", "--stage", "prune", "--no-progress")
    assert out.exit_code == 0, out.output
    assert "score: kept from an earlier run" in out.output
    for key in ("hidden_sizes", "trace", "entropy", "mlp_params"):
        assert json.loads((run / "prune.json").read_text())["result"][key] == json.loads(
            (ref / "prune.json").read_text())["result"][key], key
    _same_weights(run / "pruned", ref / "pruned")

    kept = outputs(run)
    checkpoint = _size(ref / "distill" / "checkpoints" / "global_step2")
    filler = _fill(fs, checkpoint // 2)
    out = cli("run", r, "--out", run, "--no-progress")
    assert out.exit_code == 2, out.output
    text = " ".join(out.output.split())
    ckpt = run / "distill" / "checkpoints"
    assert f"{ckpt}: cannot write the checkpoint global_step1: no space left on device" in text
    needed = int(text.split("(about ")[1].split(" bytes needed")[0].replace(",", ""))
    assert 0.9 * checkpoint < needed <= checkpoint  # tensors; not the pickles around them
    assert {k: v for k, v in outputs(run).items() if k in kept} == kept
    assert not (ckpt / "global_step1").exists() and not (run / "distilled").exists()
    filler.unlink()
    out = cli("run", r, "--out", run, "--no-progress")
    assert out.exit_code == 0, out.output
    _same_weights(run / "distilled", ref / "distilled")
    assert json.loads((run / "report.json").read_text())["accuracy"] == json.loads(
        (ref / "report.json").read_text())["accuracy"]


FSIZE_RUN = """
import resource, sys
from amp_cli.app import app
from deepspeed.comm.torch import build_shm_op
# DeepSpeed compiles its CPU all-reduce on first use (once per environment): done before
# the limit, so that the limit meets the checkpoint, not the compiler
build_shm_op()
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # writes past it fail with EFBIG
sys.argv = ["amp", *sys.argv[2:]]
app()
"""


def test_a_file_size_limit_during_distill_is_named_and_a_rerun_finishes(done, tmp_path):
    """The stand-in for a full disk where no file system can be mounted: a process file
    size limit (RLIMIT_FSIZE), under which a write fails with EFBIG as a full disk fails
    with ENOSPC. The optimizer states of the first checkpoint do not fit."""
    r, ref = done
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    for name in ("distill", "distilled", "eval.json", "report.json", "plots"):
        shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()
    kept = outputs(run)
    states = ref / "distill" / "checkpoints" / "global_step2"
    limit = max(p.stat().st_size for p in states.iterdir()) // 2
    assert limit > _size(ref / "pruned")  # the weights alone would fit
    proc = subprocess.run([sys.executable, "-c", FSIZE_RUN, str(limit), "run", str(r), "--out",
                           str(run), "--stage", "distill", "--no-progress"],
                          capture_output=True, text=True, env=child_env(COLUMNS="2000"))
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = " ".join(proc.stderr.split())
    ckpt = run / "distill" / "checkpoints"
    assert f"{ckpt}: cannot write the checkpoint global_step1: a write failed (about " in text
    assert "Traceback" not in proc.stderr
    assert {k: v for k, v in outputs(run).items() if k in kept} == kept
    assert not (ckpt / "global_step1").exists()
    out = cli("run", r, "--out", run, "--no-progress")
    assert out.exit_code == 0, out.output
    _same_weights(run / "distilled", ref / "distilled")
