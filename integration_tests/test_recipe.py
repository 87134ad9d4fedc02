"""Recipe validation: errors name the file and key path before anything is written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from amp_plugin.run.recipe import RECIPES_DIR, RecipeError, load_recipe


def _write(tmp_path, data) -> str:
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


def _demo() -> dict:
    """The demo recipe, to be written elsewhere: its committed teacher named absolutely."""
    data = yaml.safe_load((RECIPES_DIR / "demo_digits.yaml").read_text())
    data["train"]["checkpoint"] = str(RECIPES_DIR / data["train"]["checkpoint"])
    return data


def test_demo_recipe_is_valid_and_is_the_default():
    r = load_recipe(None)
    assert r.name == "demo_digits" and r.amp.threshold == pytest.approx(2e-3)
    assert r.stages[:3] == ["train", "score", "prune"]


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["amp"].update(treshold=0.1), "amp.treshold: Extra inputs are not permitted "
     "(got 0.1) (did you mean amp.threshold?)"),
    (lambda d: d.update(threshold=0.1), "threshold: Extra inputs are not permitted (got 0.1) "
     "(did you mean amp.threshold?)"),
    (lambda d: d["data"].update(epochs=3), "(did you mean train.epochs or distill.epochs?)"),
    (lambda d: d["amp"].update(threshold="high"), "amp.threshold: Input should be a valid number"),
    (lambda d: d["data"].update(batch_size=-1), "data.batch_size: Input should be greater than 0"),
    (lambda d: d.pop("model"), "model: Field required"),
    (lambda d: d["model"].pop("name"), "model.name: Field required"),
    (lambda d: d.update(stages=["prune", "score"]), "stages: Value error, stages must be"),
    (lambda d: d["amp"].update(criterion="kl"), "amp.criterion: Input should be 'entropy'"),
])
def test_schema_errors_name_the_key_path(tmp_path, edit, message):
    data = _demo()
    edit(data)
    with pytest.raises(RecipeError) as err:
        load_recipe(_write(tmp_path, data))
    assert message in str(err.value)
    assert str(tmp_path / "r.yaml") in str(err.value)


def test_missing_paths_are_named(tmp_path):
    data = _demo()
    data["stages"] = ["score", "prune"]
    data.pop("train")
    data["model"]["weights"] = str(tmp_path / "nope.safetensors")
    data["data"] = {"kind": "imagefolder", "root": str(tmp_path / "train"), "image_size": 32}
    with pytest.raises(RecipeError) as err:
        load_recipe(_write(tmp_path, data))
    text = str(err.value)
    assert f"model.weights: {tmp_path / 'nope.safetensors'} does not exist" in text
    assert f"data.root: {tmp_path / 'train'} does not exist" in text


def test_not_yaml_and_not_a_mapping(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(str(p))
    p.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="expected a mapping"):
        load_recipe(str(p))
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(str(tmp_path / "missing.yaml"))


def test_cli_rejects_bad_recipe_before_writing(tmp_path):
    data = _demo()
    data["amp"]["threshold"] = "high"
    data["output_dir"] = str(tmp_path / "run")
    out = subprocess.run([sys.executable, "-m", "amp_cli.app", "run", _write(tmp_path, data)],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "amp.threshold" in out.stderr
    assert not (tmp_path / "run").exists()


def test_overrides_use_key_paths():
    r = load_recipe(None, {"amp.threshold": 0.5, "data.val_images": 256})
    assert r.amp.threshold == 0.5 and r.data.val_images == 256


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["amp"].update(criterion="clip_entropy"),
     "amp.criterion: 'clip_entropy' needs text with each batch, but data.kind 'digits' gives "
     "labels"),
    (lambda d: d["data"].update(kind="tfrecords"), "data.kind: unknown data source 'tfrecords'"),
    (lambda d: d["data"].update(kind="coco"), "data.root: data.kind 'coco' needs it"),
    (lambda d: d.update(eval={"tasks": ["knn", "bleu"]}), "eval.tasks.1: unknown task 'bleu'"),
])
def test_registry_errors_name_the_key_path(tmp_path, edit, message):
    """What the registries know is checked at validation: a criterion its data cannot
    feed, an unknown source or task, a source's required keys."""
    data = _demo()
    edit(data)
    with pytest.raises(RecipeError) as err:
        load_recipe(_write(tmp_path, data))
    assert message in str(err.value)


def test_labels_criterion_is_fed_by_labelled_data(tmp_path):
    data = _demo()
    data["amp"]["criterion"] = "one_hot"
    assert load_recipe(_write(tmp_path, data)).amp.criterion == "one_hot"


def test_shipped_demo_finds_its_committed_teacher_from_any_directory(tmp_path, monkeypatch):
    """Relative paths in a recipe resolve against the recipe file's folder: the shipped
    demo finds the teacher committed beside it from any working directory, a copy of it
    elsewhere looks beside the copy and says where it looked."""
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe("demo_digits")
    assert recipe.train.checkpoint == str(RECIPES_DIR / "teachers" / "demo_digits")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "r.yaml").write_text((RECIPES_DIR / "demo_digits.yaml").read_text())
    with pytest.raises(RecipeError) as err:
        load_recipe(str(mine / "r.yaml"))
    assert (f"train.checkpoint: {mine / 'teachers' / 'demo_digits'} does not exist (relative "
            f"paths in a recipe resolve against its folder, {mine})") in str(err.value)
    # the teacher copied beside the recipe is found there, whatever the working directory
    shutil.copytree(RECIPES_DIR / "teachers", mine / "teachers")
    assert load_recipe(str(mine / "r.yaml")).train.checkpoint == str(
        mine / "teachers" / "demo_digits")
    # a path given with --set is the command line's: relative to the working directory
    monkeypatch.chdir(mine)
    r = load_recipe(str(mine / "r.yaml"), {"train.checkpoint": "teachers/demo_digits"})
    assert r.train.checkpoint == str(mine / "teachers" / "demo_digits")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError) as err:
        load_recipe(str(mine / "r.yaml"), {"train.checkpoint": "teachers/demo_digits"})
    assert (f"train.checkpoint: {tmp_path / 'teachers' / 'demo_digits'} does not exist (--set: "
            "relative to the working directory)") in str(err.value)


# ---- every path, checked before anything is written ---------------------------------------
def _cli(*args) -> subprocess.CompletedProcess:
    """The command in this process (CliRunner), as a finished process's exit status and
    streams."""
    from amp_cli.app import app
    from typer.testing import CliRunner

    out = CliRunner().invoke(app, [str(a) for a in args], terminal_width=400)
    return subprocess.CompletedProcess(args, out.exit_code, out.stdout, out.stderr)


def _amp(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "amp_cli.app", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "COLUMNS": "400"})


def test_validate_and_run_check_every_path_and_write_nothing(tmp_path, monkeypatch):
    """model.weights is checked even when the recipe trains its teacher (the train stage
    starts from it); each wrong path is named by its key, and `amp run` writes nothing,
    not even RUN/recipe.yaml."""
    data = _demo()
    data["output_dir"] = str(tmp_path / "run")
    data["model"]["weights"] = "weights/absent.safetensors"
    (tmp_path / "not_a_teacher").mkdir()
    data["train"]["checkpoint"] = str(tmp_path / "not_a_teacher")
    path = _write(tmp_path, data)
    for command in ("validate", "run"):
        out = _amp(command, path, cwd=tmp_path.parent) if command == "run" else _cli(
            command, path)
        assert out.returncode == 2, out.stdout + out.stderr
        message = " ".join(out.stderr.split())
        assert (f"model.weights: {tmp_path / 'weights' / 'absent.safetensors'} does not exist "
                f"(relative paths in a recipe resolve against its folder, {tmp_path})") in message
        assert (f"train.checkpoint: {tmp_path / 'not_a_teacher'} is not a saved model folder "
                "(with amp.json)") in message
        assert not (tmp_path / "run").exists()

    # the wrong kind of file or folder, by key
    (tmp_path / "weights").mkdir()
    data["model"]["weights"] = "weights"
    data["stages"] = ["score", "prune"]
    data.pop("train")
    data["data"] = {"kind": "imagefolder", "root": "images.txt", "image_size": 32}
    (tmp_path / "images.txt").write_text("not a folder")
    monkeypatch.chdir(tmp_path)
    out = _cli("validate", _write(tmp_path, data), "--set", "data.val_root=elsewhere")
    message = " ".join(out.stderr.split())
    assert out.returncode == 2
    assert f"model.weights: {tmp_path / 'weights'} is not a weights file" in message
    assert f"data.root: {tmp_path / 'images.txt'} is not a folder" in message
    assert (f"data.val_root: {tmp_path / 'elsewhere'} does not exist (--set: relative to the "
            "working directory)") in message


def test_relative_data_folders_follow_the_recipe(tmp_path, monkeypatch):
    """A recipe and its data folder moved together validate and run from any directory;
    the recipe the run records names the folder absolutely."""
    from amp_plugin.data import get_source

    project = tmp_path / "project"
    example = get_source("imagefolder").example(project)
    data = {"name": "mine", "output_dir": str(tmp_path / "run"), "stages": ["score"],
            "model": {"library": "timm", "name": "vit_small_patch16_224", "kwargs": {
                "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
                "num_classes": 0}},
            "data": {**example, "root": str(Path(example["root"]).relative_to(project)),
                     "val_root": str(Path(example["val_root"]).relative_to(project)),
                     "workers": 0}}
    (project / "mine.yaml").write_text(yaml.safe_dump(data))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = _cli("validate", project / "mine.yaml")
    assert out.returncode == 0 and "mine: valid" in out.stdout, out.stderr
    out = _amp("run", project / "mine.yaml", "--no-progress", cwd=elsewhere)
    assert out.returncode == 0, out.stderr
    recorded = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert recorded["data"]["root"] == example["root"]
    assert json.loads((tmp_path / "run" / "scores.json").read_text())["data"]["folder"] == (
        example["root"])


# ---- the command line's help and hints ---------------------------------------------------
def test_help_names_the_stages_and_shows_no_type_on_flags(monkeypatch):
    from amp_plugin.config import STAGES

    out = _amp("run", "--help")
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert "one of: " + ", ".join(STAGES) in text
    assert "<bool>" not in text and "<list[str]>" not in text
    assert "--stage STAGE" in text and "--set -s KEY.PATH=VALUE" in text
    top = _cli("--help")
    assert top.returncode == 0 and "<bool>" not in top.stdout and "--help" in top.stdout


def test_set_with_a_misspelt_key_suggests_the_key():
    out = _cli("validate", "--set", "amp.treshold=0.1")
    assert out.returncode == 2
    assert ("amp.treshold: Extra inputs are not permitted (got 0.1) (did you mean "
            "amp.threshold?)") in " ".join(out.stderr.split())


def test_a_recipe_extends_another(tmp_path):
    """`extends:` starts from another recipe (a shipped name or a file next to this one)
    and merges this file's keys over it, section by section."""
    (tmp_path / "child.yaml").write_text(yaml.safe_dump({
        "extends": "demo_digits.yaml", "name": "child",
        "amp": {"search": {"measure": "kl", "allocation": "global"},
                "target": {"mlp_params": 0.3}}}))
    (tmp_path / "grandchild.yaml").write_text(yaml.safe_dump({
        "extends": "child.yaml", "data": {"val_images": 256}}))
    demo = load_recipe("demo_digits")
    r = load_recipe(str(tmp_path / "grandchild.yaml"))
    assert r.name == "child" and r.data.val_images == 256 and r.data.batch_size == 128
    assert (r.amp.search.measure, r.amp.target.mlp_params) == ("kl", 0.3)
    assert r.amp.threshold == demo.amp.threshold and r.model == demo.model
    # a relative path of the base resolves against the base's folder, not this file's
    assert r.train.checkpoint == demo.train.checkpoint == str(RECIPES_DIR / "teachers" /
                                                              "demo_digits")
    (tmp_path / "a.yaml").write_text("extends: b.yaml\nname: a\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\nname: b\n")
    with pytest.raises(RecipeError, match=r"b.yaml: extends: a.yaml extends this file again"):
        load_recipe(str(tmp_path / "a.yaml"))
    (tmp_path / "c.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(RecipeError, match=r"c.yaml: extends: recipe file not found: nowhere"):
        load_recipe(str(tmp_path / "c.yaml"))
    (tmp_path / "d.yaml").write_text("extends: [demo_digits]\n")
    with pytest.raises(RecipeError, match=r"d.yaml: extends: expected a recipe file name"):
        load_recipe(str(tmp_path / "d.yaml"))
