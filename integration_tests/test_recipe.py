"""Recipe validation: errors name the file and key path before anything is written."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from amp_plugin.run.recipe import RECIPES_DIR, RecipeError, load_recipe


def _write(tmp_path, data) -> str:
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


def _demo() -> dict:
    return yaml.safe_load((RECIPES_DIR / "demo_digits.yaml").read_text())


def test_demo_recipe_is_valid_and_is_the_default():
    r = load_recipe(None)
    assert r.name == "demo_digits" and r.amp.threshold == pytest.approx(2e-3)
    assert r.stages[:3] == ["train", "score", "prune"]


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["amp"].update(treshold=0.1), "amp.treshold: Extra inputs are not permitted"),
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
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe("demo_digits")
    assert recipe.train.checkpoint == str(RECIPES_DIR.parent / "recipes/teachers/demo_digits")
    # a recipe of the user's own keeps its relative path as written
    (tmp_path / "mine.yaml").write_text((RECIPES_DIR / "demo_digits.yaml").read_text())
    assert load_recipe("mine.yaml").train.checkpoint == "recipes/teachers/demo_digits"


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
    assert r.train.checkpoint == "recipes/teachers/demo_digits"  # as written in the base
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
