"""Early decisions in a trial (`amp.search.confidence`): the bound against direct
computations, the default left exactly as it was, and sizes equal to the exact search's
on a real ViT with digits images while fewer batches are read."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random

import pytest
import torch
from conftest import digit_images, small_vit
from test_scale import _prune
from test_scale import _recipe as scale_recipe

import amp_plugin as amp
from amp_plugin.run.recipe import RecipeError, load_recipe
from amp_plugin.run.report import trace_summary
from amp_plugin.search.greedy import SearchState
from amp_plugin.search.sequential import EarlyDecisions, PairedTest, half_width, interval

# Student's t quantiles from printed tables
T_3_0975 = 3.182446305284263
T_9_0995 = 3.249835541592149


pytestmark = pytest.mark.usefixtures("one_thread")


def test_half_width_against_hand_computation():
    diffs = [1.0, 2.0, 3.0, 4.0]  # mean 2.5, sample variance 5/3
    mean, half = half_width(diffs, 10, 0.05)
    assert mean == 2.5
    assert half == pytest.approx(T_3_0975 * math.sqrt(5 / 3) * math.sqrt((1 - 4 / 10) / 4),
                                 rel=1e-12)
    # every look gets alpha / (N - min_batches): 8 looks at alpha 0.4 is 0.05 each
    lo, hi = interval(diffs, 10, 0.4, 2)
    assert (lo, hi) == pytest.approx((2.5 - half, 2.5 + half), rel=1e-12)
    # ten values of a population of 40: the finite-population factor sqrt(1 - 10/40)
    ten = [0.3, -0.1, 0.2, 0.5, 0.0, 0.1, 0.4, -0.2, 0.3, 0.1]
    m = sum(ten) / 10
    s = math.sqrt(sum((x - m) ** 2 for x in ten) / 9)
    assert half_width(ten, 40, 0.01) == pytest.approx(
        (m, T_9_0995 * s * math.sqrt(0.75 / 10)), rel=1e-12)
    with pytest.raises(ValueError, match="2 <= n <= N"):
        half_width([1.0], 10, 0.05)


def test_paired_test_decides_only_outside_the_interval():
    test = PairedTest(population=20, threshold=0.0, alpha=0.05, min_batches=4)
    assert [test.add(d) for d in (1.0, 1.1, 0.9)] == [None, None, None]  # fewer than 4
    assert test.add(1.05) is False  # well above the threshold: rejected at the 4th
    lo, _ = test.bounds
    assert lo > 0.0 and lo == interval(test.diffs, 20, 0.05, 4)[0]
    near = PairedTest(population=20, threshold=0.0, alpha=0.05, min_batches=4)
    assert all(near.add(d) is None for d in (0.1, -0.1, 0.2, -0.15, 0.05))
    assert near.bounds[0] < 0.0 < near.bounds[1]
    full = PairedTest(population=5, threshold=0.0, alpha=0.05, min_batches=4)
    assert [full.add(d) for d in (5.0, 5.0, 5.1, 5.0, 5.2)][-1] is None  # all read: exact rule


def test_interval_holds_at_every_look_at_once():
    """Normal populations of 16 values read in random order: the interval misses the mean
    of all 16 at some look in at most alpha of the passes."""
    rng = random.Random(0)
    alpha, misses, passes = 0.1, 0, 1500
    for _ in range(passes):
        pop = [rng.gauss(0.0, 1.0) for _ in range(16)]
        mu = sum(pop) / 16
        rng.shuffle(pop)
        misses += any(not lo <= mu <= hi for lo, hi in
                      (interval(pop[:n], 16, alpha, 4) for n in range(4, 16)))
    assert misses / passes <= alpha


def test_bad_confidence_is_refused(tmp_path):
    for bad in (0, 1, 1.5, -0.2):
        with pytest.raises(RecipeError, match=r"amp\.search\.confidence"):
            load_recipe(None, {"amp.search.confidence": bad})
        with pytest.raises(ValueError, match=r"confidence must be in \(0, 1\)"):
            EarlyDecisions(bad)
    with pytest.raises(RecipeError, match=r"amp\.search: .*confidence applies to allocation"):
        load_recipe(None, {"amp.search.confidence": 0.99, "amp.search.allocation": "global"})
    with pytest.raises(RecipeError, match=r"amp: .*not to budget mode"):
        load_recipe(None, {"amp.search.confidence": 0.99, "amp.target.mlp_params": 0.5})
    assert load_recipe(None, {"amp.search.confidence": 0.99}).amp.search.confidence == 0.99
    model = small_vit("mlp", seed=0, depth=2)
    val = [digit_images(8, offset=8 * i) for i in range(2)]
    imp = amp.AMPImportance(inv_temperature=20.0, show_progress=False)
    with pytest.raises(ValueError, match=r"confidence must be in \(0, 1\), got 1.0"):
        amp.AMPPruner(model, val[0][:1], imp, val, 2e-3, confidence=1.0)
    with pytest.raises(ValueError, match="confidence applies to the greedy search"):
        amp.AMPPruner(model, val[0][:1], imp, val, 2e-3, confidence=0.9,
                      target={"mlp_params": 0.5})


def _setup(seed: int, batches: int = 16, per_batch: int = 16, depth: int = 3):
    model = small_vit("mlp", seed=seed, depth=depth)
    calib = [digit_images(32, offset=1000 + 32 * i) for i in range(2)]
    val = [digit_images(per_batch, offset=per_batch * i) for i in range(batches)]
    imp = amp.AMPImportance(inv_temperature=20.0, show_progress=False)
    imp.accumulate(model, calib)
    return model, val, imp


def _search(model, val, imp, threshold, confidence):
    return amp.AMPPruner(copy.deepcopy(model), val[0][:1], imp, val, threshold,
                         show_progress=False, confidence=confidence).step()


def test_off_and_never_deciding_equal_the_exact_search():
    """confidence None is today's search; a bound that never decides (more batches first
    than there are) reads every batch, in the random order, and gives the same trace, bit
    for bit: the last comparison is always the exact one."""
    model, val, imp = _setup(seed=4, batches=6)
    exact = _search(model, val, imp, 3e-3, None)
    never = _search(model, val, imp, 3e-3, EarlyDecisions(0.99, min_batches=10**6))
    assert "early_decisions" not in exact.extra
    assert never.hidden_sizes == exact.hidden_sizes
    assert [dataclasses.astuple(t) for t in never.trace] == [
        dataclasses.astuple(t) for t in exact.trace]
    assert never.entropy == exact.entropy
    record = never.extra["early_decisions"]
    assert set(record["reads"]) <= {0, 6} and record["decided_early"] == 0
    assert sum(record["completions"].values()) == 0
    assert never.extra["image_block_forwards"] == exact.extra["image_block_forwards"]


@pytest.mark.parametrize("seed", [0, 1])
def test_early_decisions_keep_the_exact_sizes_with_fewer_batches(seed):
    model, val, imp = _setup(seed=seed)
    exact = _search(model, val, imp, 2e-3, None)
    early = _search(model, val, imp, 2e-3, 0.99)
    record = early.extra["early_decisions"]
    assert early.hidden_sizes == exact.hidden_sizes
    # the same trials, the same decisions, and each block's accepted size (read on every
    # batch once its block is decided) with exactly the entropy of the full pass
    assert [(t.block, t.size, t.accepted, t.reference) for t in early.trace] == [
        (t.block, t.size, t.accepted, t.reference) for t in exact.trace]
    for name, size in exact.hidden_sizes.items():
        kept = [t.entropy for t in exact.trace if t.block == name and t.size == size]
        assert kept == [t.entropy for t in early.trace if t.block == name and t.size == size]
    assert early.entropy == exact.entropy
    assert len(record["reads"]) == len(early.trace) and record["batches"] == 16
    assert record["decided_early"] >= 1
    assert record["batches_read"] < record["batches_full_passes"]
    assert early.extra["image_block_forwards"] < exact.extra["image_block_forwards"]
    assert record["alpha_per_trial"] == pytest.approx(0.01 / (6 * 3))
    summary = trace_summary({**early.to_dict(), **early.extra})
    assert (f"{record['decided_early']} trials decided early, {record['batches_read']:,} of "
            f"{record['batches_full_passes']:,} batches read") in summary
    with torch.no_grad():
        torch.testing.assert_close(early.flops["after"], exact.flops["after"])


def _as_needed(**kw) -> EarlyDecisions:
    return EarlyDecisions(0.99, trials=18, exact_reference=False, **kw)


@pytest.mark.parametrize("seed, threshold", [(0, 2e-3), (1, 2e-3), (2, 0.0)])
def test_reference_as_needed_keeps_the_decisions_and_the_final_entropy(seed, threshold):
    """exact_reference=False: no block's accepted size is read to the end but the last
    one searched; E_prev's value on a batch is computed when a trial reads that batch. The
    decisions, the sizes and the final E_val stay the exact search's, and every batch read
    is counted once: by a trial, a completion or as E_prev's value. With threshold 0 on
    seed 2 the middle block accepts nothing: E_prev's values carry over unchanged."""
    model, val, imp = _setup(seed=seed)
    exact = _search(model, val, imp, threshold, None)
    lazy = _search(model, val, imp, threshold, _as_needed())
    whole = [n for n, s in exact.hidden_sizes.items() if s == exact.original_sizes[n]]
    assert whole == (["blocks.1.mlp"] if threshold == 0 else [])
    record = lazy.extra["early_decisions"]
    assert lazy.hidden_sizes == exact.hidden_sizes
    assert [(t.block, t.size, t.accepted) for t in lazy.trace] == [
        (t.block, t.size, t.accepted) for t in exact.trace]
    assert lazy.entropy == exact.entropy
    searched_last = next(iter(exact.hidden_sizes))
    assert set(record["completions"]) <= {searched_last}
    assert record["exact_reference"] is False
    assert record["reference_reads"] > 0 or threshold == 0  # there: all known when needed
    assert record["batches_read"] == (sum(record["reads"]) + sum(record["completions"].values())
                                      + record["reference_reads"]
                                      + sum(record["refuted"].values()))
    assert record["decided_early"] >= 1
    assert lazy.extra["image_block_forwards"] < exact.extra["image_block_forwards"]


def test_reference_as_needed_resumes_to_the_same_search():
    """A search resumed from the state saved after its first block (E_prev's values known
    on some batches only, through JSON) ends exactly as the uninterrupted one."""
    model, val, imp = _setup(seed=0)
    saved = []
    whole = amp.AMPPruner(copy.deepcopy(model), val[0][:1], imp, val, 2e-3,
                          show_progress=False, confidence=_as_needed(),
                          on_decided=lambda s: saved.append(json.dumps(s.to_dict()))).step()
    state = SearchState.from_dict(json.loads(saved[0]))
    assert None in state.reference and any(v is not None for v in state.reference)
    resumed = amp.AMPPruner(copy.deepcopy(model), val[0][:1], imp, val, 2e-3,
                            show_progress=False, confidence=_as_needed(), resume=state).step()
    assert resumed.hidden_sizes == whole.hidden_sizes
    assert [dataclasses.astuple(t) for t in resumed.trace] == [
        dataclasses.astuple(t) for t in whole.trace]
    assert resumed.entropy == whole.entropy
    assert resumed.extra["early_decisions"] == whole.extra["early_decisions"]


def test_reference_as_needed_through_amp_prune_killed_in_the_search(tmp_path):
    """`amp prune` with `exact_reference: false`, SIGKILLed after a decided block and run
    again: it resumes from the saved state (E_prev's values as far as they were computed)
    and ends with the uninterrupted run's sizes, trace and entropies."""
    search = {"confidence": 0.99, "exact_reference": False}
    recipe = scale_recipe(tmp_path, "as_needed", data={"calib_images": 64, "val_images": 128},
                          amp={"search": search})
    ref, run = tmp_path / "ref", tmp_path / "run"
    _prune(recipe, ref)
    _prune(recipe, run, kill_when=run / "prune.partial.json")
    state = json.loads((run / "prune.partial.json").read_text())["state"]
    assert len(state["reference"]) == 8 and 1 <= len(state["sizes"]) < 4
    log = _prune(recipe, run)
    assert f"search resumed after {len(state['sizes'])} decided MLPs" in log
    r_ref = json.loads((ref / "prune.json").read_text())["result"]
    r_run = json.loads((run / "prune.json").read_text())["result"]
    assert r_ref["extra"]["early_decisions"]["exact_reference"] is False
    assert r_run["hidden_sizes"] == r_ref["hidden_sizes"]
    assert r_run["trace"] == r_ref["trace"] and r_run["entropy"] == r_ref["entropy"]
    assert r_run["extra"]["early_decisions"] == r_ref["extra"]["early_decisions"]


def test_reference_as_needed_in_a_recipe():
    search = load_recipe(None, {"amp.search.confidence": 0.99,
                                "amp.search.exact_reference": False}).amp.search
    assert search.exact_reference is False
    with pytest.raises(RecipeError, match=r"amp\.search: .*exact_reference: false applies to "
                                          r"early decisions"):
        load_recipe(None, {"amp.search.exact_reference": False})


# ---- counted cost: amp plan ---------------------------------------------------------------
def test_plan_counts_the_search_options_by_hand():
    """3 blocks, 6 steps, 8 batches of 16: the reference runs 19 full passes of 3 blocks;
    the cache fills blocks 0-1, runs block 2 for the starting E_val, and trials of block l
    run 3 - l blocks; early decisions cut the trials' part only."""
    from amp_plugin.run.plan import early_cost, implied_hours

    c = early_cost(3, 6, 8, 16, min_batches=4, read_fraction=0.5)
    f = c["image_block_forwards"]
    assert c["images"] == 128
    assert f["reference"] == 19 * 3 * 128
    assert f["cache"] == f["early_at_most"] == (2 + 1 + 6 * (3 + 2 + 1)) * 128
    trials = 6 * 6 * 128
    assert f["early_at_read_fraction"] == 3 * 128 + trials // 2
    # best case: per block one trial reads all 8 batches, the 5 others 4 of 8
    assert f["early_best_case"] == 3 * 128 + trials * (8 + 5 * 4) // (6 * 8)
    h = implied_hours({"cache": f["cache"]}, 3, 1000, 200.0, 800.0)["cache"]
    assert h["score"] == pytest.approx(1000 / 200 / 3600)
    assert h["search"] == pytest.approx(f["cache"] / 3 / 800 / 3600)


def test_cli_plan_shows_counted_cost_and_hours(tmp_path):
    import json

    from amp_cli.app import app
    from typer.testing import CliRunner

    out = tmp_path / "plan.json"
    done = CliRunner().invoke(app, ["plan", "open_clip_g", "--val-images", "50000",
                                    "--images-per-s", "215,910", "--read-fraction", "0.7",
                                    "--json", str(out)], env={"COLUMNS": "240"})
    assert done.exit_code == 0, done.output
    counted = json.loads(out.read_text())["search"]["counted"]
    f, hours = counted["image_block_forwards"], counted["hours"]
    assert counted["images"] == 49152 and counted["batches"] == 48
    assert f["reference"] == (40 * 6 + 1) * 40 * 49152
    assert hours["cache"]["score"] == pytest.approx(1281167 / 215 / 3600)
    assert hours["cache"]["search"] == pytest.approx(f["cache"] / 40 / 910 / 3600)
    assert f["early_best_case"] < f["early_at_read_fraction"] < f["cache"] < f["reference"]
    assert "search options in image-block forwards" in done.stdout
    assert f"{hours['early_at_read_fraction']['total']:.2f}" in done.stdout
    bad = CliRunner().invoke(app, ["plan", "open_clip_g", "--images-per-s", "215"])
    assert bad.exit_code == 2 and "--images-per-s" in bad.output


class _AcceptsAfterTwo(PairedTest):
    """A deliberately wrong bound: every trial accepted after two batches."""

    def decision(self):
        return True if 2 <= len(self.diffs) < self.population else None


@dataclasses.dataclass(frozen=True)
class _Reckless(EarlyDecisions):
    def test(self, batches, threshold):
        return _AcceptsAfterTwo(batches, threshold, self.alpha, 2)


def test_an_early_accept_the_full_pass_refutes_is_searched_again():
    """The accepted size that ends a block is always read to the end; when that exact value
    fails the rule, the block is searched again with every batch read, so every committed
    size passes the exact rule, and the first block searched ends as in the exact search."""
    model, val, imp = _setup(seed=0, batches=6)
    exact = _search(model, val, imp, 2e-3, None)
    early = _search(model, val, imp, 2e-3, _Reckless(0.99, min_batches=2))
    record = early.extra["early_decisions"]
    last = list(exact.hidden_sizes)[-1]  # searched first: the same model state in both
    assert last in record["refuted"] and record["refuted"][last] > 0
    assert [dataclasses.astuple(t) for t in early.trace if t.block == last] == [
        dataclasses.astuple(t) for t in exact.trace if t.block == last]
    for name, size in early.hidden_sizes.items():
        kept = [t for t in early.trace if t.block == name and t.accepted and t.size == size]
        assert all(t.entropy - t.reference <= 2e-3 for t in kept)
    assert len(record["reads"]) == len(early.trace)
    assert record["batches_read"] == (sum(record["reads"]) + sum(record["completions"].values())
                                      + sum(record["refuted"].values()))


@dataclasses.dataclass(frozen=True)
class _Logged(EarlyDecisions):
    """The real bound, with the threshold each trial's test was given written down."""

    log: list = dataclasses.field(default_factory=list, compare=False)

    def test(self, batches, threshold):
        self.log.append(threshold)
        return super().test(batches, threshold)


@pytest.mark.parametrize("nearest", [True, False])
def test_each_trial_is_paired_with_the_nearest_size_read_in_full(nearest):
    """A trial is paired with the nearest size of its block that was read on every batch
    (the block's start, the MLP whole, counts as read): its test compares the mean of the
    differences with the threshold minus that partner's exact rise over E_prev, the same
    comparison; `nearest=False` always pairs with the start. Sizes stay the exact search's."""
    model, val, imp = _setup(seed=1, batches=8)
    exact = _search(model, val, imp, 2e-3, None)
    early = _Logged(0.99, trials=18, nearest=nearest)
    result = _search(model, val, imp, 2e-3, early)
    record = result.extra["early_decisions"]
    assert result.hidden_sizes == exact.hidden_sizes and record["nearest"] is nearest
    hidden = next(iter(exact.original_sizes.values()))
    measured = [(t, r) for t, r in zip(result.trace, record["reads"], strict=True) if r]
    assert len(early.log) == len(measured)  # one test per trial measured
    shifted = 0
    for i, ((trial, _), threshold) in enumerate(zip(measured, early.log, strict=True)):
        full = {t.size: t.entropy - t.reference for t, r in measured[:i]
                if t.block == trial.block and r == 8}
        near = min(full, key=lambda s: (abs(s - trial.size), -s), default=None)
        if nearest and near is not None and abs(near - trial.size) < abs(hidden - trial.size):
            assert threshold == pytest.approx(2e-3 - full[near], rel=1e-6, abs=1e-12)
            shifted += threshold != 2e-3
        else:
            assert threshold == 2e-3
    assert (shifted > 0) is nearest
