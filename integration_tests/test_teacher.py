"""The demo's committed teacher: small, found by the train stage, and reproduced by the
project's own training script."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

import amp_plugin as amp
from amp_plugin.core.serialization import is_pruned_dir
from amp_plugin.data.digits import digits_splits
from amp_plugin.evaluate.features import extract_features, knn_top1
from amp_plugin.run.recipe import RECIPES_DIR


def _knn(model, data) -> float:
    split = digits_splits(data, 0)
    tr, te = split["train"], split["test"]
    return knn_top1(extract_features(model, tr.images, show_progress=False), tr.labels,
                    extract_features(model, te.images, show_progress=False), te.labels)


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
    fresh = amp.load_recipe("demo_digits", {"train.checkpoint": str(tmp_path / "teacher")})
    amp.run(fresh, tmp_path / "run", stages=["train"], show_progress=False)
    expected = _knn(amp.load_pruned(committed), recipe.data)
    assert _knn(amp.load_pruned(tmp_path / "teacher"), recipe.data) == pytest.approx(
        expected, abs=1.0)
    assert expected > 90
