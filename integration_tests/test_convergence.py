"""Scoring that knows when it has converged (`amp.score_convergence`): the sizes the search
can try and the buckets against hand counts, a stopped pass equal to a plain pass over the
batches it read, and a killed score stage that resumes to where an uninterrupted one stops."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import digit_images, small_vit
from safetensors.torch import load_file
from test_scale import _prune
from test_scale import _recipe as scale_recipe

import amp_plugin as amp
from amp_plugin.core.convergence import ScoreConvergence, buckets, search_sizes
from amp_plugin.core.importance import ScoreState
from amp_plugin.search.greedy import candidate_sizes


def test_search_sizes_are_every_size_the_binary_search_tries():
    assert search_sizes(16, 2) == [4, 8, 12]
    assert search_sizes(18, 2, round_to=4) == [4, 8, 12]  # units of 4 over ceil(18/4) = 5
    assert search_sizes(256, 6) == list(range(4, 256, 4))  # 63 sizes, the finest H/64
    # against the search itself: whatever it accepts, every size it tries is listed
    for hidden, steps, unit in ((256, 6, None), (100, 4, None), (1536, 6, 64), (7, 6, None)):
        listed = set(search_sizes(hidden, steps, unit))
        for seed in range(20):
            g = torch.Generator().manual_seed(seed)
            tried: list[int] = []

            def accept(size: int, g=g, tried=tried) -> bool:
                tried.append(size)
                return bool(torch.rand(1, generator=g) < 0.5)
            candidate_sizes(hidden, steps, accept, unit)
            assert set(tried) <= listed


def test_buckets_count_the_sizes_that_leave_a_neuron_out():
    scores = torch.tensor([0.5, 3.0, 1.0, 1.0, -2.0, 7.0])  # ranks: 3, 1, 2 (tie: index), ...
    sizes = [2, 4, 5]
    rank = {5: 0, 1: 1, 2: 2, 3: 3, 0: 4, 4: 5}
    want = [sum(rank[j] >= s for s in sizes) for j in range(6)]
    assert buckets(scores, sizes).tolist() == want
    assert buckets(scores, sizes).dtype == torch.int16


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="patience must be a whole number"):
        ScoreConvergence(every=4, patience=0)
    with pytest.raises(ValueError, match="tolerance must be in"):
        ScoreConvergence(tolerance=1.5)


def _batches(n: int = 16) -> list[torch.Tensor]:
    return [digit_images(8, offset=8 * i) for i in range(n)]


def _states(model, batches) -> list[ScoreState]:
    """A plain pass's running sums after every batch."""
    states: list[ScoreState] = []
    amp.AMPImportance(20.0, show_progress=False).accumulate(
        model, batches, checkpoint=lambda s: states.append(copy.deepcopy(s)), every=1)
    return states


def test_a_stopped_pass_equals_a_plain_pass_over_the_batches_it_read():
    model, batches = small_vit("mlp", seed=0, depth=2), _batches()
    converge = ScoreConvergence(every=2, patience=2, tolerance=0.3, max_steps=2)
    imp = amp.AMPImportance(20.0, show_progress=False)
    scores = imp.accumulate(model, batches, converge=converge)
    assert converge.stopped is not None and converge.stopped < len(batches)
    assert imp.num_batches == converge.stopped
    plain = amp.AMPImportance(20.0, show_progress=False)
    want = plain.accumulate(model, batches[:converge.stopped])
    assert all(torch.equal(scores[n], want[n]) for n in want)
    # each check's count of moved neurons, from the plain pass's running sums
    states, last, stable = _states(model, batches[:converge.stopped]), None, 0
    for position, moved in converge.history:
        sums = states[position - 1].sums
        now = {n: buckets(s, search_sizes(len(s), 2)) for n, s in sums.items()}
        total = sum(len(b) for b in now.values())
        want_moved = total if last is None else sum(int((now[n] != last[n]).sum())
                                                    for n in now)
        assert moved == want_moved
        stable = stable + 1 if last is not None and moved <= 0.3 * total else 0
        last = now
    assert stable == 2 and converge.history[-1][0] == converge.stopped
    assert converge.record(imp.num_batches)["stopped"] == converge.stopped


def test_a_resumed_pass_stops_where_an_uninterrupted_one_does():
    model, batches = small_vit("mlp", seed=1, depth=2), _batches()
    settings = dict(every=2, patience=2, tolerance=0.3, max_steps=2)
    whole = ScoreConvergence(**settings)
    states: list[ScoreState] = []
    want = amp.AMPImportance(20.0, show_progress=False).accumulate(
        model, batches, converge=whole, every=1,
        checkpoint=lambda s: states.append(copy.deepcopy(s)))
    assert whole.stopped is not None
    for cut in (1, 3, whole.stopped - 1):  # before the first check, between, at the last
        resume = states[cut - 1]
        again = ScoreConvergence(**settings)
        got = amp.AMPImportance(20.0, show_progress=False).accumulate(
            model, batches[cut:], resume=resume, converge=again)
        assert again.stopped == whole.stopped and again.history == whole.history
        assert all(torch.equal(got[n], want[n]) for n in want)


def _recipe(tmp_path: Path, convergence: dict | None) -> Path:
    return scale_recipe(tmp_path, "converge", model={"patch_size": 8, "embed_dim": 64,
                                                     "depth": 2},
                        data={"calib_images": 512, "val_images": 32, "batch_size": 8},
                        amp={"max_steps": 2, "checkpoint_every": 1,
                             "score_convergence": convergence})


def test_a_killed_score_stage_with_convergence_resumes_to_the_same_stop(tmp_path: Path):
    """`amp prune` with amp.score_convergence, SIGKILLed while scoring: the rerun resumes
    from the checkpoint (sums and checks) and stops at the batch an uninterrupted run stops
    at, with the same scores; both record where they stopped."""
    recipe = _recipe(tmp_path, {"every": 2, "patience": 2, "tolerance": 0.3})
    ref, run = tmp_path / "ref", tmp_path / "run"
    log = _prune(recipe, ref)
    meta = json.loads((ref / "scores.json").read_text())
    stopped = meta["convergence"]["stopped"]
    assert stopped is not None and meta["batches"] == stopped < 64
    assert "converged: the search's candidates unchanged for 2 checks" in log

    _prune(recipe, run, kill_when=run / "scores.rank0.partial")
    log = _prune(recipe, run)
    assert "score: resumed after" in log
    again = json.loads((run / "scores.json").read_text())
    assert again["convergence"] == meta["convergence"] and again["batches"] == stopped
    s_ref = load_file(str(ref / "scores.safetensors"))
    s_run = load_file(str(run / "scores.safetensors"))
    assert all(torch.equal(s_ref[k], s_run[k]) for k in s_ref)


def test_bench_scoring_against_a_direct_count():
    """`amp bench scoring`: a pass that stops after the second check (tolerance 0.9,
    patience 1) reads 2 batches; its moved neurons and sizes against a direct count."""
    from amp_cli.app import app
    from typer.testing import CliRunner

    from amp_plugin.bench.scoring import bench_scoring
    from amp_plugin.bench.search import bench_images
    from amp_plugin.core.models import create_model
    from amp_plugin.data import batches

    torch.set_num_threads(1)
    r = bench_scoring(layers=2, width=64, calib_images=128, val_images=32, batch_size=16,
                      every=1, patience=1, tolerances=(0.9,), seeds=1, show_progress=False)
    row = r["seeds"][0]
    o = row["options"]["0.9"]
    assert row["batches"] == 8 and o["stopped"] == 2 and o["batches_read"] == 2
    assert o["read_fraction"] == 0.25 and len(o["history"]) == 2
    images = bench_images(160, 32)
    calib = batches(images[32:], 16)
    torch.manual_seed(0)
    model = create_model({"library": "timm", "name": "vit_small_patch16_224",
                          "kwargs": dict(img_size=32, patch_size=8, embed_dim=64, depth=2,
                                         num_heads=1, num_classes=0)}).eval()
    whole = amp.AMPImportance(20.0, show_progress=False).accumulate(model, calib)
    two = amp.AMPImportance(20.0, show_progress=False).accumulate(model, calib[:2])
    assert o["neurons_moved"] == sum(
        int((buckets(two[n], search_sizes(len(v))) != buckets(v, search_sizes(len(v)))).sum())
        for n, v in whole.items())
    bad = CliRunner().invoke(app, ["bench", "scoring", "--tolerance", "1.5"])
    assert bad.exit_code == 2 and "--tolerance" in bad.output
