"""The metrics that keep the original model's side fixed (prototype, original_knn,
identification, cosine_to_original): each against a hand-made example and a loop written
here, on the committed demo teacher's real features, and the cache of the original's
features in a run directory."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

import amp_plugin as amp
from amp_plugin.config import DataConfig, EvalConfig
from amp_plugin.data import get_source
from amp_plugin.evaluate import (
    EvalContext,
    OriginalFeatures,
    cosine_to_original,
    evaluate_models,
    extract_features,
    identification_rate,
    knn_top1,
    original_knn_top1,
    prototype_accuracy,
)
from amp_plugin.run.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
VIT_SPEC = {"library": "timm", "name": "vit_small_patch16_224",
            "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2,
                       "num_heads": 4, "num_classes": 0}}


# ---- loops written here ---------------------------------------------------------------------
def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def loop_prototype(orig_train, train_labels, test, test_labels) -> float:
    train = [row / np.linalg.norm(row) for row in orig_train.double().numpy()]
    labels = [int(y) for y in train_labels]
    means = {c: np.mean([t for t, y in zip(train, labels, strict=True) if y == c], axis=0)
             for c in sorted(set(labels))}
    hits = 0
    for x, y in zip(test.double().numpy(), test_labels, strict=True):
        best = max(means, key=lambda c: _cos(x, means[c]))
        hits += best == int(y)
    return 100.0 * hits / len(test)


def loop_identification(orig_test, test) -> float:
    o, t = orig_test.double().numpy(), test.double().numpy()
    found = 0
    for i in range(len(t)):
        sims = [_cos(t[i], o[j]) for j in range(len(o))]
        found += all(sims[i] >= s for s in sims)
    return 100.0 * found / len(t)


def loop_cosine(orig_test, test) -> float:
    o, t = orig_test.double().numpy(), test.double().numpy()
    return float(np.mean([_cos(o[i], t[i]) for i in range(len(t))]))


def loop_knn(train, train_labels, test, test_labels, k, temperature) -> float:
    a, b = train.double().numpy(), test.double().numpy()
    hits = 0
    for i in range(len(b)):
        sims = [_cos(b[i], a[j]) for j in range(len(a))]
        votes: dict[int, float] = {}
        for j in sorted(range(len(a)), key=lambda j: -sims[j])[:k]:
            votes[int(train_labels[j])] = votes.get(int(train_labels[j]), 0.0) + math.exp(
                sims[j] / temperature)
        hits += max(votes, key=votes.get) == int(test_labels[i])
    return 100.0 * hits / len(b)


# ---- the metric functions -------------------------------------------------------------------
def test_metrics_on_hand_made_examples():
    # prototypes: class 0 along x, class 1 along y; the third test image lies on x but is a 1
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    train_y = torch.tensor([0, 0, 1, 1])
    test = torch.tensor([[1.0, 0.2], [0.2, 1.0], [1.0, 0.0]])
    test_y = torch.tensor([0, 1, 1])
    assert prototype_accuracy(train, train_y, test, test_y) == pytest.approx(200 / 3)
    # prototypes are class means of UNIT vectors: a long vector does not pull its class's
    # mean to itself (class 0 points at 45 degrees, not along x; the query is nearer class 1)
    long = torch.tensor([[100.0, 0.0], [0.0, 1.0], [1.0, 0.2]])
    assert prototype_accuracy(long, torch.tensor([0, 0, 1]), torch.tensor([[1.0, 0.1]]),
                              torch.tensor([1])) == 100.0
    # labels need not be 0..C-1
    assert prototype_accuracy(train, train_y + 7, test, test_y + 7) == pytest.approx(200 / 3)

    orig = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    moved = torch.tensor([[1.0, 0.1], [1.0, 0.0], [1.0, 1.1]])  # image 1 now looks like 0
    assert identification_rate(orig, moved) == pytest.approx(200 / 3)
    assert identification_rate(orig, orig) == 100.0
    assert identification_rate(orig, 5 * orig) == 100.0  # cosine: the scale does not count

    assert cosine_to_original(torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
                              torch.tensor([[0.0, 2.0], [3.0, 3.0]])) == pytest.approx(
        0.5 * math.sqrt(0.5))
    assert cosine_to_original(orig, -orig) == pytest.approx(-1.0)

    index = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    queries = torch.tensor([[2.0, 0.1], [0.1, 2.0], [1.0, 0.1]])
    assert original_knn_top1(index, torch.tensor([0, 1]), queries, torch.tensor([0, 1, 1]),
                             k=1) == pytest.approx(200 / 3)

    with pytest.raises(ValueError, match="dimensions"):
        cosine_to_original(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="one per test image"):
        identification_rate(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="length"):
        prototype_accuracy(train, train_y[:3], test, test_y)


@pytest.mark.parametrize("seed", [0, 1])
def test_metrics_equal_loops_on_random_features(seed):
    g = torch.Generator().manual_seed(seed)
    classes = torch.tensor([2, 3, 5, 8, 9])
    centres = torch.randn(5, 12, generator=g)
    train_y = classes[torch.randint(0, 5, (150,), generator=g)]
    test_y = classes[torch.randint(0, 5, (60,), generator=g)]

    def near(labels, noise):
        idx = torch.searchsorted(classes, labels)
        return centres[idx] + noise * torch.randn(len(labels), 12, generator=g)

    orig_train, orig_test = near(train_y, 1.0), near(test_y, 1.0)
    evaluated = orig_test + 0.8 * torch.randn(60, 12, generator=g)  # a perturbed model
    proto = prototype_accuracy(orig_train, train_y, evaluated, test_y)
    assert proto == pytest.approx(loop_prototype(orig_train, train_y, evaluated, test_y))
    assert identification_rate(orig_test, evaluated, chunk=7) == pytest.approx(
        loop_identification(orig_test, evaluated))
    assert cosine_to_original(orig_test, evaluated) == pytest.approx(
        loop_cosine(orig_test, evaluated), abs=1e-6)
    for k, t in ((20, 0.07), (5, 0.5)):
        assert original_knn_top1(orig_train, train_y, evaluated, test_y, k, t) == \
            pytest.approx(loop_knn(orig_train, train_y, evaluated, test_y, k, t))
    # the values span a range here (neither 0 nor 100): the loops were really compared
    assert 0 < proto < 100 and 0 < identification_rate(orig_test, evaluated) < 100


@pytest.fixture(scope="module")
def demo_features():
    """The committed demo teacher's features of the digits train and test splits."""
    recipe = load_recipe("demo_digits")
    teacher = amp.load_pruned(REPO / "recipes" / "teachers" / "demo_digits").eval()
    splits = get_source("digits").labelled_splits(recipe.data, recipe.seed)
    feats = {s: extract_features(teacher, splits[s].images, 256, show_progress=False)
             for s in ("train", "test")}
    return feats["train"], splits["train"].labels, feats["test"], splits["test"].labels


def test_the_original_gives_the_reference_line_and_random_features_score_lower(demo_features):
    train, train_y, test, test_y = demo_features
    own = {"prototype": prototype_accuracy(train, train_y, test, test_y),
           "original_knn": original_knn_top1(train, train_y, test, test_y),
           "identification": identification_rate(test, test),
           "cosine": cosine_to_original(test, test)}
    # against itself the original's kNN is the re-fit kNN, identification and cosine exact
    assert own["original_knn"] == knn_top1(train, train_y, test, test_y)
    assert own["identification"] == 100.0
    assert own["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert own["prototype"] > 60  # a usable zero-shot stand-in (10 classes: chance 10)
    rand = torch.randn(test.shape, generator=torch.Generator().manual_seed(0))
    chance = {"prototype": prototype_accuracy(train, train_y, rand, test_y),
              "original_knn": original_knn_top1(train, train_y, rand, test_y),
              "identification": identification_rate(test, rand),
              "cosine": cosine_to_original(test, rand)}
    assert chance["prototype"] < 25 and chance["original_knn"] < 25
    assert chance["identification"] < 2 and abs(chance["cosine"]) < 0.1
    # a random model of the same shape, judged against the original, is far off as well
    torch.manual_seed(0)
    other = amp.create_model(load_recipe("demo_digits").model).eval()
    splits = get_source("digits").labelled_splits(load_recipe("demo_digits").data, 0)
    other_test = extract_features(other, splits["test"].images, 256, show_progress=False)
    assert identification_rate(test, other_test) < 5
    assert prototype_accuracy(train, train_y, other_test, test_y) < own["prototype"] - 30


# ---- the tasks and the cache of the original's features ------------------------------------
def _digits() -> DataConfig:
    return DataConfig(kind="digits", image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)


def _halved(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    pruned = copy.deepcopy(model)
    tower, _ = amp.vision_tower(pruned)
    keep = {n: torch.arange(0, v.hidden, 2) for n, v in amp.find_mlps(tower).items()}
    amp.prune_mlps(tower, torch.zeros(1, 3, 32, 32), keep)
    return pruned


FIXED = ["prototype", "original_knn", "identification", "cosine_to_original"]


def test_tasks_equal_the_functions_and_pruned_only_loads_the_original(tmp_path):
    torch.manual_seed(2)
    original = amp.create_model(VIT_SPEC).eval()
    pruned = _halved(original)
    cfg = EvalConfig(tasks=FIXED, max_train=300, batch_size=128)
    source = get_source("digits")

    def ctx(reference=None):
        return EvalContext(_digits(), source, 0, torch.device("cpu"), show_progress=False,
                           reference=reference)

    # the original given as a later role is still evaluated first
    both = evaluate_models(cfg, {"pruned": lambda: pruned, "teacher": lambda: original},
                           ctx())
    splits = source.labelled_splits(_digits(), 0, max_train=300)
    o = {s: extract_features(original, splits[s].images, show_progress=False)
         for s in ("train", "test")}
    p = extract_features(pruned, splits["test"].images, show_progress=False)
    ytr, yte = splits["train"].labels, splits["test"].labels
    want = {"prototype": prototype_accuracy(o["train"], ytr, p, yte),
            "original_knn": original_knn_top1(o["train"], ytr, p, yte),
            "identification": identification_rate(o["test"], p),
            "cosine_to_original": cosine_to_original(o["test"], p)}
    for name in FIXED:
        assert both[name]["pruned"] == pytest.approx(want[name], abs=1e-5), name
    assert both["identification"]["teacher"] == 100.0
    assert both["cosine_to_original"]["teacher"] == pytest.approx(1.0, abs=1e-6)
    assert both["original_knn"]["teacher"] == pytest.approx(knn_top1(o["train"], ytr,
                                                                     o["test"], yte))
    assert both["identification"]["pruned"] < 100

    # only the pruned model: the original comes from the reference (and its cache)
    cache = tmp_path / "original.safetensors"
    alone = evaluate_models(cfg, {"pruned": lambda: pruned},
                            ctx(OriginalFeatures(lambda: original, cache, "v1")))
    assert cache.is_file()
    for name in FIXED:
        assert alone[name] == {"pruned": pytest.approx(both[name]["pruned"], abs=1e-5)}
    with pytest.raises(ValueError, match="original"):
        evaluate_models(cfg, {"pruned": lambda: pruned}, ctx())


def _run_dir(tmp_path: Path, seed: int) -> Path:
    """A run directory as `amp run` leaves it: recipe.yaml naming the original's weights,
    and pruned/."""
    torch.manual_seed(seed)
    model = amp.create_model(VIT_SPEC).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "teacher.safetensors"))
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    body = {"name": "fixed", "output_dir": str(run), "stages": ["eval", "report"],
            "model": {**VIT_SPEC, "weights": str(tmp_path / "teacher.safetensors")},
            "data": {"kind": "digits", "image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3},
            "eval": {"batch_size": 256, "max_train": 300}}
    (run / "recipe.yaml").write_text(yaml.safe_dump(body))
    amp.save_pruned(_halved(model), run / "pruned")
    return run


def test_original_features_cached_once_in_the_run_dir_and_reused_by_amp_eval(tmp_path):
    from amp_cli.app import app

    run = _run_dir(tmp_path, seed=5)
    cache = run / "original_features.safetensors"
    first = CliRunner().invoke(app, ["eval", str(run), "--tasks", "prototype,identification",
                                     "--no-progress"])
    assert first.exit_code == 0, first.output
    assert "original features: computed" in first.output and cache.is_file()
    stamp = cache.stat().st_mtime_ns
    ev = json.loads((run / "eval.json").read_text())
    assert ev["identification"]["teacher"] == 100.0
    assert ev["identification"]["pruned"] < 100
    assert "identification vs original" in first.output and "prototype" in first.output

    second = CliRunner().invoke(app, ["eval", str(run), "--tasks",
                                      "knn,original_knn,cosine_to_original", "--no-progress"])
    assert second.exit_code == 0, second.output
    assert "original features: read from" in second.output
    assert "original features: computed" not in second.output
    assert cache.stat().st_mtime_ns == stamp
    ev = json.loads((run / "eval.json").read_text())
    # the teacher's kNN was computed on the cached features: they are the original's
    recipe = load_recipe(run / "recipe.yaml")
    splits = get_source("digits").labelled_splits(recipe.data, recipe.seed, max_train=300)
    original = amp.create_model(recipe.model).eval()
    feats = [extract_features(original, splits[s].images, show_progress=False)
             for s in ("train", "test")]
    assert ev["accuracy"]["teacher"] == pytest.approx(
        knn_top1(feats[0], splits["train"].labels, feats[1], splits["test"].labels))
    assert ev["cosine_to_original"]["teacher"] == pytest.approx(1.0, abs=1e-6)
    assert set(ev["prototype"]) == {"teacher", "pruned"}  # the first call's numbers stay
    report = json.loads((run / "report.json").read_text())
    assert report["original_knn"] == ev["original_knn"]

    # another original (new weights at the same path): its features are computed again
    _run_dir(tmp_path, seed=6)
    third = CliRunner().invoke(app, ["eval", str(run), "--tasks", "identification",
                                     "--no-progress"])
    assert third.exit_code == 0, third.output
    assert "original features: computed" in third.output
    assert cache.stat().st_mtime_ns != stamp
    assert json.loads((run / "eval.json").read_text())["identification"]["teacher"] == 100.0


def test_tasks_refuse_data_without_labels_and_features_of_another_width():
    coco = get_source("coco")
    cfg = EvalConfig(tasks=["prototype"])
    ctx = EvalContext(_digits(), coco, 0, torch.device("cpu"), show_progress=False)
    model = amp.create_model(VIT_SPEC).eval()
    with pytest.raises(ValueError, match="prototype needs labelled images"):
        evaluate_models(cfg, {"teacher": lambda: model}, ctx)
    with pytest.raises(ValueError, match="64 dimensions"):
        prototype_accuracy(torch.zeros(4, 64), torch.zeros(4), torch.zeros(2, 32),
                           torch.zeros(2))


def test_report_shows_the_reference_line_and_notes_zero_shot_keeps_the_text_tower():
    from rich.console import Console

    from amp_plugin.run.report import render_table

    report = {"name": "t", "prototype": {"teacher": 85.75, "pruned": 60.36},
              "identification": {"teacher": 100.0, "pruned": 24.5},
              "cosine_to_original": {"teacher": 1.0, "pruned": 0.87841},
              "zeroshot_classification": {"in1k": {"teacher": {"top1": 60.0},
                                                   "pruned": {"top1": 50.0}}}}
    console = Console(record=True, width=220)
    console.print(render_table(report))
    text = console.export_text()
    line = next(row for row in text.splitlines() if "identification" in row)
    assert "100.00" in line and "24.50" in line and "-75.50" in line
    line = next(row for row in text.splitlines() if "cosine to original" in row)
    assert "1.000" in line and "0.878" in line and "-0.122" in line
    line = next(row for row in text.splitlines() if "zero-shot in1k top1" in row)
    assert line.split("top1 (%)")[1].lstrip().startswith("*")
    assert "* zero-shot keeps the original's text tower" in text
