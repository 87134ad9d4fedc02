"""Hostile input, faults and tampered files: each is refused with a message naming what is
wrong (exit status 2 on the command line), no foreign code runs, and no stale result is
kept. Real files, real processes, a tiny ViT on the digits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from amp_cli.app import app
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import amp_plugin as amp
from amp_plugin.data import get_source
from amp_plugin.distill.checkpoints import weights_only_loads
from amp_plugin.distill.inputs import DistillError
from amp_plugin.run.recipe import load_recipe
from amp_plugin.utils.finite import NonFiniteError, check_inputs
from amp_plugin.utils.io import atomic_dir, atomic_write

SPEC = {"library": "timm", "name": "vit_small_patch16_224", "kwargs": {
    "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
    "num_classes": 0}}
DATA = {"kind": "digits", "image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3,
        "calib_images": 64, "val_images": 64, "batch_size": 32, "workers": 0}

# A pickle whose only effect, if it were ever unpickled, is to create a flag file.
PLANT = """
import pathlib, sys, torch
class Payload:
    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(sys.argv[2]),))
torch.save({"module": Payload()}, sys.argv[1])
"""


def recipe(tmp: Path, name: str = "r", **sections) -> Path:
    data = {"name": name, "seed": 0, "output_dir": str(tmp / "run"),
            "stages": ["score", "prune"], "model": SPEC, "data": DATA,
            "amp": {"threshold": 2e-3, "max_steps": 3}, **sections}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def amp_process(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "amp_cli.app", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in path.rglob("*")}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("saved") / "model"
    amp.save_pruned(amp.create_model(SPEC), path)
    return path


def tampered(saved: Path, tmp_path: Path, edit) -> Path:
    out = tmp_path / "model"
    out.mkdir()
    (out / "model.safetensors").write_bytes((saved / "model.safetensors").read_bytes())
    manifest = json.loads((saved / "amp.json").read_text())
    text = edit(manifest)
    (out / "amp.json").write_text(text if isinstance(text, str) else json.dumps(manifest))
    return out


# ---- a pruned model is data: the manifest allow-list -------------------------------------
def _kw(key, value):
    return lambda m: m["spec"]["kwargs"].__setitem__(key, value)


@pytest.mark.parametrize("edit,message", [
    (_kw("act_layer", "sys.exit"), "kwargs.act_layer: 'sys.exit' is not allowed"),
    (_kw("norm_layer", "os.system"), "kwargs.norm_layer: 'os.system' is not allowed"),
    (_kw("block_fn", "torch.nn.functional.relu"), "kwargs.block_fn: 'torch.nn.functional.relu'"),
    (_kw("mlp_layer", "timm.layers.to_2tuple"), "kwargs.mlp_layer: 'timm.layers.to_2tuple'"),
    (lambda m: m["spec"].__setitem__("name", "hf-hub:timm/vit_base_patch16_224"),
     "spec.name: 'hf-hub:timm/vit_base_patch16_224' names a model hub"),
    (_kw("pretrained_cfg_overlay", {"file": "/tmp/x.pth"}), "kwargs.pretrained_cfg_overlay"),
    (_kw("checkpoint_path", "/tmp/x.pth"), "kwargs.checkpoint_path: '/tmp/x.pth' would load"),
    (lambda m: m["spec"].__setitem__("library", "pickle"), "unknown model library 'pickle'"),
    (lambda m: m["spec"].__setitem__("weights", "../../etc/passwd"),
     "spec.weights: '../../etc/passwd'"),
    (lambda m: m.pop("shapes"), "shapes: missing"),
    (lambda m: m.__setitem__("shapes", "all"), "shapes: expected an object of lists of sizes"),
    (lambda m: m["spec"].__setitem__("kwargs", [1]), "spec.kwargs: Input should be a valid "
                                                     "dictionary"),
    (lambda m: m["shapes"].__setitem__("blocks.0.mlp.fc1.weight", [7, 32]),
     "shapes do not match model.safetensors: first differences at ['blocks.0.mlp.fc1.weight']"),
    (lambda m: m.__setitem__("format", "other/9"), "format: 'other/9', expected 'amp-pruned/1'"),
    (lambda m: "{not json", "not valid JSON"),
    (lambda m: "[1, 2]", "expected a JSON object, got list"),
])
def test_tampered_manifest_is_refused_before_anything_is_imported(saved, tmp_path, edit,
                                                                  message):
    path = tampered(saved, tmp_path, edit)
    modules = set(sys.modules)
    with pytest.raises(ValueError) as err:
        amp.load_pruned(path)
    assert str(path / "amp.json") in str(err.value)
    assert message in str(err.value)
    assert set(sys.modules) - modules == set()  # nothing was imported on the manifest's word


def test_open_clip_pretrained_flag_in_a_manifest_is_refused(tmp_path):
    spec = {"library": "open_clip", "name": "EVA02-B-16", "kwargs": {
        "image_only": True, "vision_cfg": {"timm_model_pretrained": True}}}
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "amp.json").write_text(json.dumps(
        {"format": "amp-pruned/1", "spec": spec, "shapes": {}, "aliases": {}, "meta": {}}))
    save_file({}, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"kwargs.vision_cfg.timm_model_pretrained: True "
                                         r"would load pretrained weights"):
        amp.load_pruned(tmp_path / "m")


def test_allowed_callables_still_build(saved, tmp_path):
    path = tampered(saved, tmp_path, _kw("act_layer", "torch.nn.SiLU"))
    model = amp.load_pruned(path)
    assert isinstance(model.blocks[0].mlp.act, torch.nn.SiLU)


def test_damaged_weights_file_is_named(saved, tmp_path):
    path = tampered(saved, tmp_path, lambda m: None)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        amp.load_pruned(path)


def test_eval_on_a_tampered_run_exits_2_and_keeps_eval_json(saved, tmp_path):
    run = tmp_path / "run"
    r = recipe(tmp_path)
    amp.run(load_recipe(r), run, stages=["score", "prune"], show_progress=False)
    (run / "eval.json").write_text('{"tasks": []}\n')
    manifest = json.loads((run / "pruned" / "amp.json").read_text())
    manifest["spec"]["kwargs"]["act_layer"] = "sys.exit"
    (run / "pruned" / "amp.json").write_text(json.dumps(manifest))
    out = cli("eval", run, "--tasks", "knn", "--no-progress")
    assert out.exit_code == 2, out.output
    assert "kwargs.act_layer: 'sys.exit' is not allowed" in out.output
    assert (run / "eval.json").read_text() == '{"tasks": []}\n'


# ---- DeepSpeed checkpoints are loaded weights-only ---------------------------------------
def test_planted_checkpoint_pickle_never_runs(tmp_path):
    """A real `amp distill` process resumes from a planted checkpoint: refused, exit 2,
    the payload's flag file never appears."""
    r = recipe(tmp_path, distill={"max_steps": 2, "batch_size": 16, "workers": 0})
    run = tmp_path / "run"
    amp.run(load_recipe(r), run, stages=["score", "prune"], show_progress=False)
    step = run / "distill" / "checkpoints" / "global_step1"
    step.mkdir(parents=True)
    (step.parent / "latest").write_text("global_step1")
    flag = tmp_path / "FLAG"
    subprocess.run([sys.executable, "-c", PLANT, str(step / "mp_rank_00_model_states.pt"),
                    str(flag)], check=True)
    proc = amp_process("distill", r, "--no-progress")
    output, _ = proc.communicate(timeout=600)  # DeepSpeed may first compile its CPU op
    assert proc.returncode == 2, output
    assert "mp_rank_00_model_states.pt: refused: the checkpoint would import" in output
    assert not flag.exists()
    assert not (run / "distilled").exists()


def test_torch_loads_inside_are_forced_weights_only(tmp_path):
    """Even a load that asks for weights_only=False (as DeepSpeed's do) of a file the
    inspection does not see is refused."""
    planted, flag = tmp_path / "state.bin", tmp_path / "FLAG"
    subprocess.run([sys.executable, "-c", PLANT, str(planted), str(flag)], check=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DistillError, match="not weights-only data"):
        with weights_only_loads(tmp_path / "empty"):
            torch.load(planted, weights_only=False)
    assert not flag.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def test_latest_naming_a_path_is_refused(tmp_path):
    from amp_plugin.distill.checkpoints import read_tag

    (tmp_path / "latest").write_text("../../elsewhere")
    with pytest.raises(DistillError, match="names '../../elsewhere', not a checkpoint folder"):
        read_tag(tmp_path)


# ---- file modes follow the umask; leftovers of killed saves go away -----------------------
@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755),
                                                      (0o077, 0o600, 0o700)])
def test_outputs_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        f = atomic_write(tmp_path / "a.json", "{}")
        d = atomic_dir(tmp_path / "d", lambda t: (t / "x").write_text("1"))
    finally:
        os.umask(old)
    assert f.stat().st_mode & 0o777 == file_mode
    assert d.stat().st_mode & 0o777 == dir_mode


def test_leftovers_of_a_killed_save_are_removed(saved, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = tmp_path / f".pruned.{dead.pid}.abcd1234"
    (leftover / "big").mkdir(parents=True)
    old = tmp_path / f".pruned.{dead.pid}.abcd1234.old"
    old.mkdir()
    live = tmp_path / f".pruned.{os.getppid()}.zzzz9999"  # a live writer's folder stays
    live.mkdir()
    amp.save_pruned(amp.load_pruned(saved), tmp_path / "pruned")
    assert not leftover.exists() and not old.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["pruned", live.name])


# ---- nothing stale ------------------------------------------------------------------------
def test_replaced_weights_redo_score_and_prune_only(tmp_path):
    torch.manual_seed(1)
    weights = tmp_path / "w.safetensors"
    save_file(amp.create_model(SPEC).state_dict(), str(weights))
    r = recipe(tmp_path, model={**SPEC, "weights": str(weights)})
    run = tmp_path / "run"
    amp.run(load_recipe(r), run, stages=["score", "prune"], show_progress=False)
    first = {k: v.clone() for k, v in load_file(str(run / "scores.safetensors")).items()}
    prune_first = json.loads((run / "prune.json").read_text())

    # only a cache setting changes: both stages are kept, files untouched
    before = tree(run)
    amp.run(load_recipe(r, {"amp.cache.host_gib": 1.0, "amp.cache.device_gib": 0.5}), run,
            stages=["score", "prune"], show_progress=False)
    after = tree(run)
    rewritten = ("recipe.yaml", ".lock")
    assert {k: v for k, v in after.items() if k not in rewritten} == {
        k: v for k, v in before.items() if k not in rewritten}

    # other weights at the same path with the same size and mtime
    st = weights.stat()
    torch.manual_seed(2)
    save_file(amp.create_model(SPEC).state_dict(), str(weights))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights.stat().st_size == st.st_size
    amp.run(load_recipe(r), run, stages=["score", "prune"], show_progress=False)
    second = load_file(str(run / "scores.safetensors"))
    assert any(not torch.equal(first[k], second[k]) for k in first)
    assert json.loads((run / "prune.json").read_text())["fingerprint"] != (
        prune_first["fingerprint"])


def test_retrained_teacher_redoes_the_scores(tmp_path):
    train = {"epochs": 1, "batch_size": 64, "lr": 1e-3}
    r = recipe(tmp_path, train=train, stages=["train", "score"])
    run = tmp_path / "run"
    amp.run(load_recipe(r), run, show_progress=False)
    first = {k: v.clone() for k, v in load_file(str(run / "scores.safetensors")).items()}
    amp.run(load_recipe(r, {"train.lr": 3e-3}), run, show_progress=False)
    second = load_file(str(run / "scores.safetensors"))
    assert any(not torch.equal(first[k], second[k]) for k in first)


def test_damaged_stage_outputs_are_redone(tmp_path):
    r = recipe(tmp_path)
    run = tmp_path / "run"
    amp.run(load_recipe(r), run, stages=["score", "prune"], show_progress=False)
    good = {k: v.clone() for k, v in load_file(str(run / "scores.safetensors")).items()}
    sizes = json.loads((run / "prune.json").read_text())["result"]["hidden_sizes"]
    (run / "scores.safetensors").write_bytes(b"\0" * 100)
    weights = run / "pruned" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\x7f" * 8)
    amp.run(load_recipe(r), run, stages=["score", "prune"], show_progress=False)
    again = load_file(str(run / "scores.safetensors"))
    assert all(torch.equal(good[k], again[k]) for k in good)
    assert json.loads((run / "prune.json").read_text())["result"]["hidden_sizes"] == sizes
    amp.load_pruned(run / "pruned")


# ---- one run per directory ----------------------------------------------------------------
def _wait_for_lock(lock: Path, pid: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 240
    while time.time() < deadline:
        if lock.is_file() and lock.read_text() and json.loads(lock.read_text())["pid"] == pid:
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.1)
    raise AssertionError("the first run never took the lock")


def test_second_run_is_refused_and_a_dead_holder_is_taken_over(tmp_path):
    r = recipe(tmp_path)
    run, lock = tmp_path / "run", tmp_path / "run" / ".lock"
    first = amp_process("run", r, "--no-progress")
    try:
        _wait_for_lock(lock, first.pid, first)
        os.kill(first.pid, signal.SIGSTOP)  # holds the lock, does nothing
        out = cli("run", r, "--no-progress")
        assert out.exit_code == 2, out.output
        assert f"{run} is in use by pid {first.pid}" in out.output
        assert "amp_cli.app run" in out.output or "app.py run" in out.output
        os.kill(first.pid, signal.SIGKILL)  # dies holding it
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    out = cli("run", r, "--no-progress")
    assert out.exit_code == 0, out.output
    assert f"pid {first.pid}" in out.output and "took over the lock" in out.output
    assert (run / "prune.json").is_file()
    assert lock.read_text() == ""  # released


STOPPED_RANK = """
import os, signal
from amp_plugin.utils import dist as ddp
ddp.init_from_env()
if ddp.rank() == 1:
    os.kill(os.getpid(), signal.SIGSTOP)  # frozen, not dead: its sockets stay open
ddp.barrier()
"""


def test_a_stopped_rank_fails_the_job_naming_it():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [subprocess.Popen(
        [sys.executable, "-c", STOPPED_RANK], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                        "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                        "AMP_DIST_TIMEOUT_S": "3"}) for r in (0, 1)]
    try:
        output, _ = procs[0].communicate(timeout=180)
    finally:
        procs[1].kill()
        procs[1].wait()
    assert procs[0].returncode != 0
    assert "rank 0: the other ranks did not all arrive within 3 s (AMP_DIST_TIMEOUT_S)" in output


# ---- settings that would give a silently wrong result --------------------------------------
@pytest.mark.parametrize("overrides,message", [
    ({"data.batch_size": 1}, "data.batch_size: at least 2: the entropy criterion"),
    ({"data.batch_size": True}, "data.batch_size: expected a number, got a boolean"),
    ({"amp.max_steps": False}, "amp.max_steps: expected a number, got a boolean"),
    ({"data.val_images": 16}, "val_images 16 is smaller than one batch (batch_size 32)"),
    ({"data.calib_images": 8}, "calib_images 8 is smaller than one batch"),
])
def test_settings_giving_wrong_results_are_refused(tmp_path, overrides, message):
    r = recipe(tmp_path)
    args = [a for k, v in overrides.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    out = cli("run", r, *args, "--no-progress")
    assert out.exit_code == 2, out.output
    assert message in " ".join(out.output.split())
    assert not (tmp_path / "run").exists()


def test_non_finite_weights_and_activations_are_located(tmp_path):
    torch.manual_seed(0)
    model = amp.create_model(SPEC)
    sd = model.state_dict()
    sd["blocks.1.mlp.fc1.weight"][0, 0] = float("nan")
    weights = tmp_path / "nan.safetensors"
    save_file(sd, str(weights))
    out = cli("run", recipe(tmp_path, model={**SPEC, "weights": str(weights)}), "--no-progress")
    assert out.exit_code == 2, out.output
    assert "score: the model's blocks.1.mlp.fc1.weight holds NaN or inf values" in out.output

    sd["blocks.1.mlp.fc1.weight"].fill_(3e38)  # finite weights, overflowing activations
    save_file(sd, str(weights))
    out = cli("run", recipe(tmp_path, "r2", model={**SPEC, "weights": str(weights)},
                            output_dir=str(tmp_path / "run2")), "--no-progress")
    assert out.exit_code == 2, out.output
    assert ("score: calibration batch 0: the output of module blocks.1.mlp.fc1 is the first "
            "non-finite value") in " ".join(out.output.split())

    with pytest.raises(NonFiniteError, match="prune: validation batch 1 holds NaN"):
        check_inputs("prune", model, [torch.zeros(2), torch.tensor([0.0, float("inf")])],
                     "validation")


# ---- clear errors, nothing written ----------------------------------------------------------
def _weights_case(tmp_path, kind):
    w = tmp_path / "w.safetensors"
    torch.manual_seed(0)
    sd = amp.create_model(SPEC).state_dict()
    if kind == "empty":
        w.write_bytes(b"")
        return w, f"model.weights: {w} is empty"
    if kind == "truncated":
        save_file(sd, str(w))
        w.write_bytes(w.read_bytes()[:200])
        return w, f"model.weights: {w} is not a readable safetensors checkpoint"
    if kind == "text":
        w = tmp_path / "w.pth"
        w.write_text("these are not weights")
        return w, f"model.weights: {w} is not a readable torch (weights-only) checkpoint"
    other = amp.create_model({**SPEC, "kwargs": {**SPEC["kwargs"], "depth": 3,
                                                 "embed_dim": 48}}).state_dict()
    save_file(other, str(w))
    return w, "missing [] (0), unexpected ['blocks.2.attn.proj.bias'"


@pytest.mark.parametrize("kind", ["empty", "truncated", "text", "other architecture"])
def test_bad_weights_are_named_before_anything_is_written(tmp_path, kind):
    w, message = _weights_case(tmp_path, kind)
    out = cli("run", recipe(tmp_path, model={**SPEC, "weights": str(w)}), "--no-progress")
    assert out.exit_code == 2, out.output
    assert message in " ".join(out.output.split())
    if kind == "other architecture":
        assert "shape mismatches ['cls_token (1, 1, 48) (model: (1, 1, 32))'" in out.output
    assert not (tmp_path / "run").exists()


def test_image_size_that_does_not_fit_the_model(tmp_path):
    out = cli("run", recipe(tmp_path), "--set", "data.image_size=48", "--no-progress")
    assert out.exit_code == 2, out.output
    assert "data.image_size: 48 does not fit the model" in out.output
    assert not (tmp_path / "run").exists()


def _image_folder(tmp_path: Path, bad: str) -> Path:
    from amp_plugin.data.digits import write_digit_images

    root = tmp_path / "images"
    write_digit_images(root, range(0, 120))
    victim = sorted(root.rglob("*.png"))[5]
    if bad == "truncated":
        victim.write_bytes(victim.read_bytes()[:40])
    elif bad == "empty":
        victim.write_bytes(b"")
    else:
        victim.write_text("not an image")
    return victim


@pytest.mark.parametrize("bad", ["truncated", "empty", "text"])
def test_unreadable_image_is_named_or_skipped(tmp_path, bad, caplog):
    victim = _image_folder(tmp_path, bad)
    data = {**DATA, "kind": "imagefolder", "root": str(tmp_path / "images"),
            "calib_images": 50, "val_images": 64}
    r = recipe(tmp_path, data=data)
    out = cli("run", r, "--no-progress")
    assert out.exit_code == 2, out.output
    assert f"data.root: {victim} is not a readable image" in " ".join(out.output.split())
    assert "skip_bad_images" in out.output
    # images are streamed: the stage that reads the file stops, completed stages stay
    assert not (tmp_path / "run" / "pruned").exists()
    source = get_source("imagefolder")
    cfg = load_recipe(r, {"data.skip_bad_images": True}).data
    with caplog.at_level("WARNING", logger="amp"):
        calib, val = source.amp_batches(cfg, 0)
    assert sum(len(b) for b in calib) == 50 and sum(len(b) for b in val) == 64
    assert f"skipped 1 unreadable images, first {victim}" in caplog.text


@pytest.mark.parametrize("text,message", [
    ("name: a\nseed: 1\nseed: 2\n", "duplicate key 'seed' (first on line 2)"),
    (b"name: \xff\xfe\n", "not a UTF-8 text file"),
    ("name: [unclosed\n", "not valid YAML"),
    ("name: !!python/object/apply:os.system ['touch FLAG']\n", "not valid YAML"),
])
def test_recipe_files_that_are_not_plain_yaml(tmp_path, text, message):
    p = tmp_path / "bad.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    out = cli("run", p)
    assert out.exit_code == 2, out.output
    assert str(p) in " ".join(out.output.split()) and message in out.output
    assert not (tmp_path / "FLAG").exists()


@pytest.mark.parametrize("args,message", [
    (["--set", "amp.threshold=[1, 2"], "the value is not plain YAML data"),
    (["--set", "amp.threshold=!!python/name:os.system"], "the value is not plain YAML data"),
    (["--set", "seed.deeper=1"], "--set seed.deeper: seed is 0, not a section with keys"),
    (["--stage", "prnue"], "unknown stage 'prnue'; choose from train, score, prune"),
])
def test_command_line_mistakes(tmp_path, args, message):
    out = cli("run", recipe(tmp_path), *args)
    assert out.exit_code == 2, out.output
    assert message in " ".join(out.output.replace("│", " ").split())
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("captions,message", [
    ("{broken", "is not valid JSON"),
    ({"images": {}, "annotations": []}, "expected top-level lists 'images' and 'annotations'"),
    ({"images": [{"id": 1, "file_name": "a.png"}],
      "annotations": [{"image_id": 1, "caption": None}]},
     "annotations[0].caption is None, expected a non-empty string (image_id 1)"),
    ({"images": [{"id": 1, "file_name": "a.png"}],
      "annotations": [{"image_id": 1, "caption": "a"}, {"image_id": [1], "caption": "b"}]},
     "annotations[1].image_id is [1] (list), expected an integer or string id"),
    ({"images": [{"id": 1, "file_name": "a.png"}],
      "annotations": [{"image_id": {"id": 1}, "caption": "a"}]},
     "annotations[0].image_id is {'id': 1} (dict), expected an integer or string id"),
    ({"images": [{"id": 1, "file_name": "a.png"}],
      "annotations": [{"image_id": True, "caption": "a"}]},
     "annotations[0].image_id is True (bool), expected an integer or string id"),
    ({"images": [{"id": 1, "file_name": "a.png"}, {"id": [2], "file_name": "b.png"}],
      "annotations": [{"image_id": 1, "caption": "a"}]},
     "images[1].id is [2] (list), expected an integer or string id"),
    ({"images": [{"id": 1, "file_name": 7}], "annotations": [{"image_id": 1, "caption": "a"}]},
     "images[0].file_name is 7, expected a file name relative to data.root"),
    ({"images": [{"id": 1, "file_name": "../../etc/passwd"}],
      "annotations": [{"image_id": 1, "caption": "a"}]},
     "images[0].file_name is '../../etc/passwd', expected a file name relative to data.root"),
    ({"images": [{"id": 1, "file_name": "a.png"}], "annotations": [[1, "a"]]},
     "annotations[0] needs 'image_id' and 'caption'"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
])
def test_bad_coco_captions(tmp_path, captions, message):
    from amp_plugin.data.coco import read_captions

    f = tmp_path / "captions.json"
    f.write_text(captions if isinstance(captions, str) else json.dumps(captions))
    with pytest.raises(ValueError) as err:
        read_captions(f, tmp_path)
    assert f"data.captions: {f}" in str(err.value) and message in str(err.value)


def test_coco_captions_are_checked_before_any_work(tmp_path):
    """`amp run` in its own process: a captions file with a list as an image id is named
    (key and annotation index) before the model is built or the run directory made."""
    from amp_plugin.data.digits import write_digit_images

    images = tmp_path / "images"
    paths = write_digit_images(images, range(0, 8))
    anns = [{"image_id": i, "caption": "a digit"} for i in range(8)]
    anns[5]["image_id"] = [5]
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({
        "images": [{"id": i, "file_name": str(p.relative_to(images))}
                   for i, p in enumerate(paths)], "annotations": anns}))
    data = {**DATA, "kind": "coco", "root": str(images), "captions": str(captions),
            "calib_images": 4, "val_images": 4, "batch_size": 2}
    proc = amp_process("run", recipe(tmp_path, data=data), "--no-progress")
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, output
    assert (f"data.captions: {captions}: annotations[5].image_id is [5] (list), expected an "
            "integer or string id") in " ".join(output.split())
    assert "Traceback" not in output
    assert not (tmp_path / "run").exists()


# ---- tampered stage outputs: refused naming the file, or computed again with a log line ----
@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory) -> tuple[Path, Path]:
    """(recipe, run directory) of a completed score and prune run."""
    tmp = tmp_path_factory.mktemp("pruned_run")
    r = recipe(tmp)
    amp.run(load_recipe(r), tmp / "run", stages=["score", "prune"], show_progress=False)
    return r, tmp / "run"


def wide_cli(*args: str):
    """The command line with log lines wide enough to hold a message and its paths."""
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "2000"})


def _copy_run(pruned_run, tmp_path) -> tuple[Path, Path]:
    import shutil

    r, run = pruned_run
    shutil.copytree(run, tmp_path / "run")
    return r, tmp_path / "run"


def _huge_header(path: Path) -> None:
    # the first 8 bytes give the header's length: here 2**62 bytes, in a 40-byte file
    path.write_bytes((2**62).to_bytes(8, "little") + b'{"a": 1}' + b"\0" * 24)


def _lying_header(path: Path) -> None:
    # a well-formed header whose one tensor claims 2**40 floats
    header = json.dumps({"blocks.0.mlp": {"dtype": "F32", "shape": [2**40],
                                          "data_offsets": [0, 2**42]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)


SCORE_TAMPERS = {
    "shape": (lambda s: {**s, "blocks.0.mlp": s["blocks.0.mlp"][:64]},
              "blocks.0.mlp has shape (64,), the model's MLP has 128 hidden neurons"),
    "dtype": (lambda s: {**s, "blocks.1.mlp": s["blocks.1.mlp"].long()},
              "blocks.1.mlp is int64, expected floating-point values"),
    "nan": (lambda s: {**s, "blocks.1.mlp": s["blocks.1.mlp"].clone().index_fill_(
        0, torch.tensor([3]), float("nan"))}, "blocks.1.mlp holds NaN or inf values"),
    "names": (lambda s: {"blocks.0.mlp": s["blocks.0.mlp"], "head.mlp": s["blocks.1.mlp"]},
              "holds other MLPs than the model's (missing ['blocks.1.mlp'], unexpected "
              "['head.mlp'])"),
    "huge header": (_huge_header, "not a readable safetensors file"),
    "lying header": (_lying_header, "not a readable safetensors file"),
}


def _tamper_scores(run: Path, kind: str) -> str:
    """Rewrite scores.safetensors and record its new hash in scores.json, as an edit of
    both files would: only the content check can tell."""
    import hashlib

    edit, message = SCORE_TAMPERS[kind]
    path = run / "scores.safetensors"
    if kind.endswith("header"):
        edit(path)
    else:
        save_file(edit(load_file(str(path))), str(path))
    meta = json.loads((run / "scores.json").read_text())
    meta["output_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (run / "scores.json").write_text(json.dumps(meta))
    return f"{path}: {message}"


@pytest.mark.parametrize("kind", list(SCORE_TAMPERS))
def test_tampered_scores_are_computed_again(pruned_run, tmp_path, kind):
    r, run = _copy_run(pruned_run, tmp_path)
    good = {k: v.clone() for k, v in load_file(str(run / "scores.safetensors")).items()}
    sizes = json.loads((run / "prune.json").read_text())["result"]["hidden_sizes"]
    message = _tamper_scores(run, kind)
    (run / "prune.json").unlink()  # the search reads the scores again
    out = wide_cli("run", r, "--out", run, "--no-progress")
    assert out.exit_code == 0, out.output
    text = " ".join(out.output.split())
    assert f"score: {message}" in text and "; computing the scores again" in text
    again = load_file(str(run / "scores.safetensors"))
    assert set(again) == set(good) and all(torch.equal(good[k], again[k]) for k in good)
    assert json.loads((run / "prune.json").read_text())["result"]["hidden_sizes"] == sizes


def test_tampered_scores_are_named_when_only_the_search_runs(pruned_run, tmp_path):
    r, run = _copy_run(pruned_run, tmp_path)
    message = _tamper_scores(run, "nan")
    (run / "prune.json").unlink()
    out = wide_cli("run", r, "--out", run, "--stage", "prune", "--no-progress")
    assert out.exit_code == 2, out.output
    assert f"{message}: run the score stage again" in " ".join(out.output.split())
    assert not (run / "prune.json").exists()


PRUNE_TAMPERS = {
    "too wide": (lambda res: res["hidden_sizes"].update({"blocks.0.mlp": 10**9}),
                 "result.hidden_sizes.blocks.0.mlp is 1000000000, outside 0..128 (the MLP's "
                 "hidden width)"),
    "negative": (lambda res: res["hidden_sizes"].update({"blocks.1.mlp": -5}),
                 "result.hidden_sizes.blocks.1.mlp is -5, outside 0..128"),
    "not numbers": (lambda res: res.update(hidden_sizes="all"),
                    "result.hidden_sizes is 'all', expected an object of whole numbers"),
    "other widths": (lambda res: res["original_sizes"].update({"blocks.0.mlp": 4096}),
                     "result.original_sizes {'blocks.0.mlp': 4096, 'blocks.1.mlp': 128} are "
                     "not the model's MLP widths"),
}


@pytest.mark.parametrize("kind", list(PRUNE_TAMPERS))
def test_tampered_search_results_are_searched_again(pruned_run, tmp_path, kind):
    r, run = _copy_run(pruned_run, tmp_path)
    good = json.loads((run / "prune.json").read_text())
    edit, message = PRUNE_TAMPERS[kind]
    bad = json.loads(json.dumps(good))
    edit(bad["result"])
    (run / "prune.json").write_text(json.dumps(bad))
    # the report alone refuses the file (exit 2) ...
    if kind != "other widths":  # (the report knows no model: its own original sizes)
        out = wide_cli("run", r, "--out", run, "--stage", "report", "--no-progress")
        assert out.exit_code == 2, out.output
        assert f"{run / 'prune.json'}: {message}" in " ".join(out.output.split())
    # ... the prune stage searches again, to the same result
    out = wide_cli("run", r, "--out", run, "--no-progress")
    assert out.exit_code == 0, out.output
    assert f"prune: {run / 'prune.json'}: {message}" in " ".join(out.output.split())
    assert "searching again" in out.output
    again = json.loads((run / "prune.json").read_text())["result"]
    for key in ("hidden_sizes", "original_sizes", "trace", "mlp_params", "entropy"):
        assert again[key] == good["result"][key], key


def test_search_result_differing_from_the_pruned_model_is_searched_again(pruned_run, tmp_path):
    r, run = _copy_run(pruned_run, tmp_path)
    good = json.loads((run / "prune.json").read_text())
    bad = json.loads(json.dumps(good))
    bad["result"]["hidden_sizes"] = {k: 8 for k in bad["result"]["hidden_sizes"]}
    (run / "prune.json").write_text(json.dumps(bad))
    out = wide_cli("run", r, "--out", run, "--no-progress")
    assert out.exit_code == 0, out.output
    assert "are not the pruned model's" in " ".join(out.output.split())
    assert json.loads((run / "prune.json").read_text())["result"]["hidden_sizes"] == (
        good["result"]["hidden_sizes"])
    (run / "prune.json").write_text("{not json")
    out = wide_cli("run", r, "--out", run, "--no-progress")
    assert out.exit_code == 0, out.output
    assert f"prune: {run / 'prune.json'}: not valid JSON" in " ".join(out.output.split())
    assert json.loads((run / "prune.json").read_text())["result"]["hidden_sizes"] == (
        good["result"]["hidden_sizes"])


def test_tampered_progress_files_start_the_stage_over(pruned_run, tmp_path):
    """The partial sums of a killed score stage and the state of a killed search are
    checked like the outputs: damaged or out of range, the stage starts over (logged)."""
    r, run = _copy_run(pruned_run, tmp_path)
    good = {k: v.clone() for k, v in load_file(str(run / "scores.safetensors")).items()}
    result = json.loads((run / "prune.json").read_text())
    for name in ("scores.safetensors", "scores.json", "prune.json"):
        (run / name).unlink()
    _huge_header(run / "scores.rank0.partial")
    (run / "prune.partial.json").write_text(json.dumps({
        "fingerprint": result["fingerprint"],
        "state": {"sizes": {"blocks.1.mlp": 999}, "trace": [], "e_prev": None,
                  "e_start": None, "evaluations": 0}}))
    out = wide_cli("run", r, "--out", run, "--no-progress")
    assert out.exit_code == 0, out.output
    text = " ".join(out.output.split())
    assert (f"score: {run / 'scores.rank0.partial'}: not a readable safetensors file"
            in text and "starting the score stage over" in text)
    assert (f"prune: {run / 'prune.partial.json'}: state.sizes.blocks.1.mlp is 999, not a "
            "size of one of the model's MLPs; starting the search over") in text
    again = load_file(str(run / "scores.safetensors"))
    assert all(torch.equal(good[k], again[k]) for k in good)
    assert json.loads((run / "prune.json").read_text())["result"]["hidden_sizes"] == (
        result["result"]["hidden_sizes"])


# ---- bombs and odd files: refused quickly or read as the transform expects, never a hang ----
def _laughs(levels: int = 9) -> str:
    """The "billion laughs": each level names the previous one 9 times (9**9 values)."""
    lines = ['a0: &a0 "lol"']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("kind", ["aliases", "aliases in --set", "itself", "large", "deep"])
def test_recipe_bombs_are_refused_quickly(tmp_path, kind):
    r = recipe(tmp_path)
    args = []
    if kind == "aliases":  # in the model's free-form kwargs, which validation would walk
        text = r.read_text().replace("kwargs:", "kwargs:\n    laughs: *a9\n    x_:", 1)
        r.write_text(_laughs() + text)
        message = f"{r}: holds "
    elif kind == "aliases in --set":
        args = ["--set", "model.kwargs.laughs=" + "{" + ", ".join(
            _laughs(8).strip().splitlines()) + "}"]
        message = "values once its YAML aliases are expanded"
    elif kind == "itself":  # PyYAML builds a list that holds itself
        r.write_text(r.read_text() + "extra: &me [1, *me]\n")
        message = f"{r}: a value holds itself (a YAML alias inside its own anchor)"
    elif kind == "large":
        r.write_text(r.read_text() + "".join(f"# {i:0100d}\n" for i in range(12000)))
        message = f"{r}: more than 1,048,576 bytes, too large for a recipe"
    else:
        r.write_text(r.read_text() + "extra: " + "[" * 20000 + "]" * 20000 + "\n")
        message = f"{r}: nested too deeply to be a recipe"
    t0 = time.perf_counter()
    out = cli("run", r, *args, "--no-progress")
    seconds = time.perf_counter() - t0
    assert out.exit_code == 2, out.output
    text = " ".join(out.output.split())
    assert message in text
    if kind.startswith("aliases"):  # at least the 9**8 (9**9) strings of the laughs
        count = int(text.split("holds ")[1].split(" values once")[0].replace(",", ""))
        assert count > 9 ** (8 if "--set" in kind else 9)
    assert seconds < 60, seconds  # refused before anything walks the expanded data (an
    # expanded bomb would take hours; the bound leaves room for a loaded machine)
    assert not (tmp_path / "run").exists()


def _png_bomb(path: Path, side: int = 100_000) -> None:
    """A PNG whose header claims side x side pixels (10 G): 100 bytes on disk."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grey
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _odd_images(folder: Path) -> dict[str, tuple]:
    """Images in modes other than 8-bit RGB, each of one colour: {file: the RGB colour
    the transform should see}."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    want = {}

    def save(name, im, rgb, **kw):
        im.save(folder / name, **kw)
        want[name] = rgb

    save("one_pixel.png", Image.new("RGB", (1, 1), (5, 6, 7)), (5, 6, 7))
    save("cmyk.tif", Image.new("CMYK", (12, 9), (0, 255, 0, 0)), (255, 0, 255))
    grey16 = Image.fromarray(np.full((10, 10), 200 * 257, dtype=np.uint16))
    assert grey16.mode == "I;16"
    save("grey16.png", grey16, (200, 200, 200))  # a plain conversion would give white
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 40, 90, 160] + [0] * 762)
    save("palette.png", palette, (40, 90, 160), transparency=0)
    save("alpha.png", Image.new("RGBA", (8, 8), (10, 20, 30, 0)), (10, 20, 30))
    save("grey_alpha.png", Image.new("LA", (8, 8), (77, 128)), (77, 77, 77))
    return want


def test_images_in_odd_modes_are_read_as_the_transform_expects(tmp_path):
    """1x1, CMYK, 16-bit grey, palette with transparency, RGBA and grey+alpha files give
    exactly what the evaluation transform gives for the same colour in 8-bit RGB."""
    from PIL import Image

    from amp_plugin.data.images import image_files
    from amp_plugin.data.transforms import eval_transform

    want = _odd_images(tmp_path / "images" / "odd")
    tf = eval_transform(32, [0.5] * 3, [0.5] * 3)
    ds = image_files(tmp_path / "images", tf)
    assert len(ds) == len(want)
    for (file, _), (x, _) in zip(ds.samples, ds):
        size = Image.open(file).size
        expected = tf(Image.new("RGB", size, want[Path(file).name]))
        assert torch.equal(x, expected), file


def _bad_file(victim: Path, kind: str) -> None:
    victim.unlink()
    if kind == "bomb":
        _png_bomb(victim)
    elif kind == "fifo":
        os.mkfifo(victim)  # opening it to read would wait for a writer forever
    elif kind == "link loop":
        victim.symlink_to(victim.with_name("other.link"))  # (not an image name itself)
        victim.with_name("other.link").symlink_to(victim)
    elif kind == "float":
        from PIL import Image

        Image.new("F", (8, 8), 0.5).save(victim.with_suffix(".tif"))
        victim.with_suffix(".tif").rename(victim.with_suffix(".tiff"))


@pytest.mark.parametrize("kind,message", [
    ("bomb", "exceeds limit"),
    ("fifo", "not a regular file"),
    ("link loop", "Too many levels of symbolic links"),
    ("float", "float pixels of no known range"),
])
def test_odd_files_in_an_image_folder_are_named_never_a_hang(tmp_path, kind, message):
    """`amp run` on a folder of digits and odd images (in its own process under a timeout
    where a read could block: a hang fails the test); one file that cannot be read is named
    with the reason."""
    from amp_plugin.data.digits import write_digit_images

    root = tmp_path / "images"
    write_digit_images(root, range(0, 60))
    _odd_images(root / "odd")  # read fine, mixed in
    victim = sorted((root / "zero").glob("*.png"))[0]
    _bad_file(victim, kind)
    if kind == "float":
        victim = victim.with_suffix(".tiff")
    data = {**DATA, "kind": "imagefolder", "root": str(root), "calib_images": "all",
            "val_images": 32, "batch_size": 32}  # every file is read
    r = recipe(tmp_path, data=data)
    if kind == "fifo":
        proc = amp_process("run", r, "--no-progress", env={**os.environ, "COLUMNS": "2000"})
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 2, output
    else:
        result = wide_cli("run", r, "--no-progress")
        output = result.output
        assert result.exit_code == 2, output
    text = " ".join(output.split())
    assert f"data.root: {victim} is not a readable image (" in text and message in text
    assert "Traceback" not in output
    # skipped on request, the rest of the folder (the odd images included) is used
    cfg = load_recipe(r, {"data.skip_bad_images": True}).data
    calib, val = get_source("imagefolder").amp_batches(cfg, 0)
    assert sum(len(b) for b in calib) == 60 + 6 - 32 and sum(len(b) for b in val) == 32


def test_a_loop_of_links_in_an_image_folder_is_named(tmp_path):
    from amp_plugin.data.digits import write_digit_images

    root = tmp_path / "images"
    write_digit_images(root, range(0, 120))
    (root / "zero" / "again").symlink_to(root, target_is_directory=True)
    r = recipe(tmp_path, data={**DATA, "kind": "imagefolder", "root": str(root)})
    t0 = time.perf_counter()
    out = cli("run", r, "--no-progress")
    assert out.exit_code == 2, out.output
    assert (f"data.root: {root / 'zero' / 'again'} is {root} again (a loop of symbolic "
            "links)") in " ".join(out.output.split())
    assert time.perf_counter() - t0 < 60
    # a link to a folder elsewhere is followed as before
    (root / "zero" / "again").unlink()
    (tmp_path / "more").mkdir()
    write_digit_images(tmp_path / "more", range(200, 210))
    (root / "zero" / "more").symlink_to(tmp_path / "more" / "one", target_is_directory=True)
    from amp_plugin.data.images import image_files

    files = [p for p, _ in image_files(root).samples]
    assert len(files) == 120 + len(list((tmp_path / "more" / "one").glob("*.png")))
