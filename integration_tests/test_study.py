"""`amp study`'s parts checked against direct computations (the study itself is a
benchmark: `amp study`, about 30 minutes)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch
from conftest import digit_images, small_vit

import amp_plugin as amp
from amp_plugin.bench.study import (
    FIXED_SIDE,
    METRICS,
    Draw,
    Probe,
    StudyConfig,
    magnitude_scores,
    rerender,
    run_study,
    summarize,
    uniform_prune,
)
from amp_plugin.evaluate import (
    cosine_to_original,
    extract_features,
    identification_rate,
    knn_top1,
    original_knn_top1,
    prototype_accuracy,
)
from amp_plugin.run.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]


def test_uniform_prune_keeps_the_same_top_scored_neurons_in_every_block():
    model = small_vit(depth=3)
    x = digit_images(8)
    views = amp.find_mlps(model)
    scores = {n: torch.rand(v.hidden, generator=torch.Generator().manual_seed(i))
              for i, (n, v) in enumerate(views.items())}
    want_fc1 = {n: v.inputs[0].weight.detach().clone() for n, v in views.items()}
    per_neuron = sum(v.param_counts()[1] for v in views.values())
    fixed = sum(v.param_counts()[0] for v in views.values())
    target = fixed + 100 * per_neuron
    with torch.no_grad():
        before = model(x)
    pruned, res = uniform_prune(model, scores, target, x[:1])
    assert set(res["hidden_sizes"].values()) == {100}
    assert res["mlp_params"] == target
    for n, v in amp.find_mlps(pruned).items():
        top = scores[n].argsort(descending=True)[:100].sort().values
        torch.testing.assert_close(v.inputs[0].weight, want_fc1[n][top])
    with torch.no_grad():  # the teacher is left as it was
        torch.testing.assert_close(model(x), before)


def test_magnitude_scores_rank_neurons_by_their_weights():
    """Torch-Pruning's L2 MagnitudeImportance over an MLP's group ranks neurons as the
    squared norms of their fc1 row and fc2 column do."""
    model = small_vit(depth=2)
    d = Draw(calib=[(digit_images(4), torch.zeros(4, dtype=torch.long))],
             val_images=digit_images(4), batch_size=4)
    scores = magnitude_scores(model, d)
    for n, v in amp.find_mlps(model).items():
        fc1, fc2 = v.inputs[0], v.output
        direct = fc1.weight.detach().pow(2).sum(1) + fc2.weight.detach().pow(2).sum(0)
        assert torch.equal(scores[n].argsort(), direct.argsort()), n


def test_study_budgets_are_fractions_of_mlp_parameters_from_a_fifth_to_two_thirds():
    assert StudyConfig.budgets == (0.2, 0.35, 0.5, 0.65)


def test_probe_judges_against_the_original_teacher_first(tmp_path):
    """The study's metrics of the original and of a pruned model: the fixed-side ones
    against the teacher's features, equal to the functions on directly extracted features;
    the original gives the reference line (identification 100, cosine 1)."""
    recipe = load_recipe("demo_digits")
    teacher = amp.load_pruned(REPO / "recipes" / "teachers" / "demo_digits").eval()
    probe = Probe(recipe)
    original = probe(teacher, teacher)
    assert list(original) == list(METRICS)  # fixed side first, then kNN and probe re-fit
    assert all(math.isfinite(v) for v in original.values())
    assert original["identification"] == 100.0
    assert original["cosine_to_original"] == pytest.approx(1.0, abs=1e-6)
    assert original["original_knn"] == original["knn"]  # its own index
    x = digit_images(8)
    views = amp.find_mlps(teacher)
    scores = {n: torch.rand(v.hidden, generator=torch.Generator().manual_seed(i))
              for i, (n, v) in enumerate(views.items())}
    fixed = sum(v.param_counts()[0] for v in views.values())
    per = sum(v.param_counts()[1] for v in views.values())
    pruned, _ = uniform_prune(teacher, scores, fixed + 24 * per, x[:1])  # random 24 of 256
    got = probe(pruned, teacher)
    tr, te = probe.split["train"], probe.split["test"]
    o = [extract_features(teacher, s.images, show_progress=False) for s in (tr, te)]
    p = extract_features(pruned, te.images, show_progress=False)
    assert got["prototype"] == pytest.approx(prototype_accuracy(o[0], tr.labels, p, te.labels))
    assert got["original_knn"] == pytest.approx(original_knn_top1(o[0], tr.labels, p,
                                                                  te.labels))
    assert got["identification"] == pytest.approx(identification_rate(o[1], p))
    assert got["cosine_to_original"] == pytest.approx(cosine_to_original(o[1], p), abs=1e-6)
    p_train = extract_features(pruned, tr.images, show_progress=False)
    assert got["knn"] == pytest.approx(knn_top1(p_train, tr.labels, p, te.labels))
    assert got["identification"] < 100 and got["cosine_to_original"] < 1
    assert all(math.isfinite(v) for v in got.values())


def _metrics(knn: float, suffix: str = "") -> dict[str, float]:
    values = dict(prototype=knn - 10, original_knn=knn - 5, identification=knn - 40,
                  cosine_to_original=knn / 100, knn=knn, linear=knn - 1)
    return {f"{k}{suffix}": v for k, v in values.items()}


def _rows():
    rows = []
    for seed, (knn, kept) in enumerate(((90.0, 0.5), (92.0, 0.52), (94.0, 0.48))):
        base = dict(teacher="demo", seed=seed)
        rows.append(dict(base, experiment="original", **dict(
            _metrics(95.0), identification=100.0, cosine_to_original=1.0)))
        for crit in ("entropy", "one_hot", "magnitude"):
            rows.append(dict(base, experiment="criterion", criterion=crit, kept=kept,
                             hidden_sizes={"a": 10}, threshold=1e-3, reached=seed != 2,
                             **_metrics(knn), **_metrics(knn + 1, "_distilled")))
        for how, m in (("authors", knn - 20), ("uniform", knn), ("global_kl", knn + 2 + seed)):
            rows.append(dict(base, experiment="budget", how=how, budget=0.5, kept=kept,
                             hidden_sizes={"a": 10}, reached=how != "authors" or seed != 0,
                             **_metrics(m), **_metrics(m + 1 + seed, "_distilled")))
        for n, size in ((64, 8 + seed), (128, 10)):
            rows.append(dict(base, experiment="val_size", val_images=n, kept=kept,
                             hidden_sizes={"a": size}, original_sizes={"a": 20},
                             **_metrics(knn)))
    return rows


def test_summary_and_report_from_rows(tmp_path):
    config = dict(seeds=[0, 1, 2], deep_depth=8, deep_epochs=30, budgets=[0.5],
                  criterion_budget=0.5, val_sizes=[64, 128], tolerance=0.02, max_searches=8,
                  distill_epochs=1, threshold=2e-3, inv_temperature=20.0, max_steps=6,
                  calib_images=512, teachers=["demo"], deep_teacher_seed=None, demo_depth=4)
    (tmp_path / "study.json").write_text(json.dumps(
        {"config": config, "rows": _rows(), "seconds": {"total": 60.0}, "processes": 3}))
    result = rerender(tmp_path)
    s = result["summary"]["demo"]
    entropy = s["criterion"]["entropy"]
    assert entropy["knn"]["mean"] == pytest.approx(92.0)
    assert entropy["knn"]["sd"] == pytest.approx(statistics.stdev([90.0, 92.0, 94.0]))
    assert entropy["knn_distilled"]["mean"] == pytest.approx(93.0)
    assert entropy["prototype"]["mean"] == pytest.approx(82.0)
    assert entropy["identification_distilled"]["mean"] == pytest.approx(53.0)
    assert s["original"]["identification"] == {"mean": 100.0, "sd": 0.0, "n": 3}
    assert all(m in s["budget"]["uniform"][0] for m in METRICS)
    assert all(m in s["val_size"][0] for m in FIXED_SIDE)
    assert (entropy["seeds"], entropy["reached"]) == (3, 2)
    # size change vs the largest validation set: |8-10|, |9-10|, 0 of 20 neurons
    v64 = s["val_size"][0]
    assert v64["size_change"]["mean"] == pytest.approx(statistics.fmean([0.1, 0.05, 0.0]))
    md = (tmp_path / "study.md").read_text()
    assert "target missed in 1 of 3 seeds" in md and "| 50% |" in md
    assert "| 50% | authors' rule (greedy entropy rise) | 50.0 ± 2.0 (target missed in 1 of " \
           "3 seeds) |" in md
    # every table shows the fixed-side metrics first, re-fit kNN and probe after them
    header = ("| prototype | kNN, original's index | identification | cosine to original | "
              "kNN re-fit | probe re-fit |")
    assert md.count(header) == 6  # + the distilled sizings and the paired differences
    # paired by seed against uniform: global_kl - uniform = 2, 3, 4 points, distilled too
    # ((knn + 2 + seed) + 1 + seed) - (knn + 1 + seed)
    g = s["paired"]["global_kl"][0]
    assert g["budget"] == 0.5
    assert g["prototype"] == pytest.approx({"mean": 3.0, "sd": 1.0, "n": 3})
    assert g["knn_distilled"] == pytest.approx({"mean": 3.0, "sd": 1.0, "n": 3})
    assert s["paired"]["authors"][0]["prototype"]["mean"] == pytest.approx(-20.0)
    assert "uniform" not in s["paired"]
    assert (s["budget"]["authors"][0]["seeds"], s["budget"]["authors"][0]["reached"]) == (3, 2)
    assert "| 50% | global, KL | pruned | 3.0 ± 1.0 |" in md
    assert "| original | 85.0 ± 0.0 | 90.0 ± 0.0 | 100.0 ± 0.0 | 1.000 ± 0.000 | 95.0 ± 0.0 " \
           "| 94.0 ± 0.0 |" in md
    assert "| 50% | uniform | 50.0 ± 2.0 | 82.0 ± 2.0 |" in md
    assert "| entropy Taylor (AMP) | distilled |" in md
    for png in ("adaptive_vs_uniform", "criteria", "val_size", "block_sizes"):
        assert (tmp_path / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
        assert f"![{png}]({png}.png)" in md
    assert json.loads((tmp_path / "study.json").read_text())["summary"] == \
        json.loads(json.dumps(result["summary"]))
    assert summarize(result["rows"], config) == result["summary"]


def test_a_study_of_some_experiments_reports_just_those(tmp_path):
    config = dict(seeds=[0, 1, 2], deep_depth=8, deep_epochs=30, budgets=[0.5],
                  criterion_budget=0.5, val_sizes=[64, 128], tolerance=0.02, max_searches=8,
                  distill_epochs=1, threshold=2e-3, inv_temperature=20.0, max_steps=6,
                  calib_images=512, teachers=["demo"], experiments=["budget"],
                  deep_teacher_seed=None, demo_depth=4)
    rows = [r for r in _rows() if r["experiment"] in ("original", "budget")]
    (tmp_path / "study.json").write_text(json.dumps(
        {"config": config, "rows": rows, "seconds": {"total": 60.0}, "processes": 3}))
    s = rerender(tmp_path)["summary"]["demo"]
    assert s["criterion"] == {} and s["val_size"] == []
    assert s["paired"]["global_kl"][0]["prototype"] == pytest.approx(
        {"mean": 3.0, "sd": 1.0, "n": 3})
    md = (tmp_path / "study.md").read_text()
    assert "### Per-block sizes at equal MLP parameters" in md
    assert "### Criterion" not in md and "### Validation-set size" not in md
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["adaptive_vs_uniform.png"]


def test_unknown_experiment_refused_before_any_work(tmp_path):
    cfg = StudyConfig(out=tmp_path / "s", recipe=load_recipe("demo_digits"),
                      experiments=("budget", "ablation"))
    with pytest.raises(ValueError, match="experiments: expected some of criteria, budget, "
                                         "val_size, got ablation"):
        run_study(cfg)
    assert not (tmp_path / "s").exists()
