"""Throughput that can be trusted: models timed in turns on the same batch and threads,
medians with their spread, and gains claimed only beyond it."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from conftest import small_vit
from rich.console import Console
from scipy.stats import binom

import amp_plugin as amp
from amp_plugin.bench.throughput import time_runtimes
from amp_plugin.evaluate import get_task
from amp_plugin.evaluate.throughput import compare_throughput
from amp_plugin.run.report import render_table
from amp_plugin.utils.stats import median_interval, paired_ratio, quartiles
from amp_plugin.utils.timing import time_interleaved


# ---- statistics ----------------------------------------------------------------------------
@pytest.mark.parametrize("level", [0.9, 0.95])
def test_median_interval_is_the_order_statistic_pair_of_the_binomial(level):
    for n in range(1, 41):
        values = list(np.random.default_rng(n).normal(size=n))
        low, high, coverage = median_interval(values, level)
        v = sorted(values)
        # the largest k with P(Bin(n, 1/2) <= k - 1) <= (1 - level) / 2, at least 1
        ks = [k for k in range(1, (n + 1) // 2 + 1) if binom.cdf(k - 1, n, 0.5)
              <= (1 - level) / 2]
        k = max(ks, default=1)
        assert (low, high) == (v[k - 1], v[n - k])
        assert coverage == pytest.approx(1 - 2 * binom.cdf(k - 1, n, 0.5))
        if ks:
            assert coverage >= level
    assert median_interval(list(range(20)))[:2] == (5, 14)  # x(6), x(15) of 20


def test_quartiles_and_paired_ratio_against_numpy():
    x = list(np.random.default_rng(0).uniform(10, 20, size=13))
    q = quartiles(x)
    assert [q["q1"], q["median"], q["q3"]] == pytest.approx(np.percentile(x, [25, 50, 75]))
    assert (q["min"], q["max"]) == (min(x), max(x))
    rng = np.random.default_rng(1)
    before = list(rng.uniform(90, 110, size=20))
    faster = [b * 1.5 * rng.uniform(0.98, 1.02) for b in before]
    r = paired_ratio(faster, before)
    assert r["ratio"] == pytest.approx(np.median(faster) / np.median(before))
    assert r["differs"] and 1.4 < r["low"] <= r["ratio"] <= r["high"] < 1.6
    same = [b * rng.uniform(0.9, 1.1) for b in before]
    r = paired_ratio(same, before)
    assert not r["differs"] and r["low"] < 1 < r["high"]
    with pytest.raises(ValueError, match="need pairs"):
        paired_ratio([1.0, 2.0], [1.0])


# ---- timing in turns -----------------------------------------------------------------------
def test_time_interleaved_takes_turns_and_groups_short_calls():
    calls = []
    runners = {k: (lambda k=k: calls.append(k)) for k in "ABC"}
    out = time_interleaved(runners, repeats=3, warmup=2)
    assert "".join(calls) == "ABC" * 2 + "ABC" + "CBA" + "ABC"
    assert all(len(out[k]["seconds"]) == 3 and out[k]["number"] == 1 for k in "ABC")

    def nap():
        time.sleep(0.002)

    out = time_interleaved({"nap": nap}, repeats=2, warmup=0, min_seconds=0.01)
    assert 1 <= out["nap"]["number"] <= 5  # a call lasts >= 2 ms: at most 5 make 10 ms
    assert all(s >= 0.002 for s in out["nap"]["seconds"])
    with pytest.raises(ValueError, match="repeats >= 1"):
        time_interleaved(runners, repeats=0)


def test_compare_throughput_times_every_model_and_leaves_them_as_they_were():
    a, b = small_vit(depth=2), small_vit(depth=2, seed=1)
    tower, _ = amp.vision_tower(b)
    keep = {n: torch.arange(v.hidden // 4) for n, v in amp.find_mlps(tower).items()}
    amp.prune_mlps(tower, torch.zeros(1, 3, 32, 32), keep)
    b.train()
    fused = [m.fused_attn for m in a.modules() if hasattr(m, "fused_attn")]
    threads = torch.get_num_threads()
    out = compare_throughput({"teacher": a, "pruned": b}, batch_size=4, image_size=32,
                             device="cpu", warmup=1, runs=5, min_seconds=0.0, threads=1,
                             sdpa=not fused[0], show_progress=False)
    cond = out.pop("conditions")
    assert cond["interleaved"] == ["teacher", "pruned"] and cond["threads"] == 1
    assert "(1 threads)" in cond["device"] and torch.get_num_threads() == threads
    for r in out.values():
        per_run = r["runs_images_per_s"]
        assert len(per_run) == 5 and r["images_per_s"] == pytest.approx(np.median(per_run))
        assert r["q1"] == pytest.approx(np.percentile(per_run, 25))
        assert r["min"] <= r["q1"] <= r["images_per_s"] <= r["q3"] <= r["max"]
    # the models as they were: mode, dtype, attention switch
    assert b.training and not a.training
    assert [m.fused_attn for m in a.modules() if hasattr(m, "fused_attn")] == fused
    bf16 = compare_throughput({"m": a}, 2, 32, "bf16", "cpu", 0, 2, min_seconds=0.0,
                              show_progress=False)
    assert bf16["m"]["images_per_s"] > 0 and bf16["conditions"]["dtype"] == "bf16"
    assert all(p.dtype == torch.float32 for p in a.parameters())  # a cast copy was timed


# ---- the eval task and the report ----------------------------------------------------------
def _section(teacher, pruned, distilled):
    cond = {"device": "cpu (2 threads)", "dtype": "float32", "batch_size": 64, "runs": 10}
    section = {role: {"images_per_s": float(np.median(r)), "q1": float(np.percentile(r, 25)),
                      "q3": float(np.percentile(r, 75)), "runs_images_per_s": r, **cond}
               for role, r in (("teacher", teacher), ("pruned", pruned),
                               ("distilled", distilled))}
    models = {"teacher": {"flops": 145}, "pruned": {"flops": 100}, "distilled": {"flops": 100}}
    get_task("throughput").finish(section, models)
    return section


def _table_text(section) -> str:
    console = Console(record=True, width=250)
    console.print(render_table({"name": "t", "throughput": section}))
    return console.export_text()


def test_report_claims_a_gain_only_beyond_the_spread():
    rng = np.random.default_rng(0)
    teacher = list(rng.uniform(950, 1050, size=10))
    pruned = [t * 1.45 * rng.uniform(0.97, 1.03) for t in teacher]
    distilled = [p * rng.uniform(0.9, 1.1) for p in pruned]
    section = _section(teacher, pruned, distilled)
    gain = section["pruned_gain"]
    want = paired_ratio(pruned, teacher)
    assert gain["throughput"] == pytest.approx(want["ratio"]) and gain["differs"]
    assert gain["efficiency"] == pytest.approx(want["ratio"] / 1.45)
    assert gain["efficiency_low"] == pytest.approx(want["low"] / 1.45)
    same = section["distilled_vs_pruned"]
    assert same == paired_ratio(distilled, pruned) and not same["differs"]
    text = _table_text(section)
    line = next(ln for ln in text.splitlines() if "throughput (img/s)" in ln)
    p = section["pruned"]
    assert f"{p['images_per_s']:.0f} [{p['q1']:.0f}-{p['q3']:.0f}]" in line
    assert f"x{want['ratio']:.2f} [{want['low']:.2f}-{want['high']:.2f}] (FLOPs x1.45)" in line
    assert "no gain" not in line
    line = next(ln for ln in text.splitlines() if "gain / FLOPs ratio" in ln)
    assert f"{want['ratio'] / 1.45:.2f} [{want['low'] / 1.45:.2f}-" in line
    line = next(ln for ln in text.splitlines() if "distilled / pruned" in ln)
    assert f"x{same['ratio']:.2f} [{same['low']:.2f}-{same['high']:.2f}]" in line
    assert "same within the spread" in line

    # no difference between the original and the pruned model: no gain claimed
    section = _section(teacher, [t * rng.uniform(0.9, 1.1) for t in teacher],
                       [t * 2 for t in teacher])
    assert not section["pruned_gain"]["differs"]
    text = _table_text(section)
    line = next(ln for ln in text.splitlines() if "throughput (img/s)" in ln)
    assert "no gain beyond the spread: x" in line
    assert "differs beyond the spread" in text  # distilled, twice as fast, is told apart


def test_bench_runtimes_in_turns_and_a_runtime_that_cannot_run_is_named():
    a, b = small_vit(depth=2), small_vit(depth=2, seed=1)
    out, skipped = time_runtimes({"before": a, "after": b}, 4, 32, "float32",
                                 torch.device("cpu"), runs=3, warmup=1, runtimes=("eager",),
                                 min_seconds=0.0, show_progress=False)
    assert skipped == {} and set(out) == {"eager"} and set(out["eager"]) == {"before", "after"}
    assert all(len(r["runs_images_per_s"]) == 3 for r in out["eager"].values())
    # onnxruntime: the export (checked against PyTorch) timed next to eager
    out, skipped = time_runtimes({"m": a}, 4, 32, "float32", torch.device("cpu"), runs=2,
                                 warmup=1, runtimes=("eager", "onnxruntime"),
                                 min_seconds=0.0, show_progress=False)
    assert skipped == {} and out["onnxruntime"]["m"]["images_per_s"] > 0
    out, skipped = time_runtimes({"m": a}, 2, 32, "bf16", torch.device("cpu"), runs=1,
                                 warmup=0, runtimes=("eager", "onnxruntime"),
                                 min_seconds=0.0, show_progress=False)
    assert set(out) == {"eager"} and "float32 only" in skipped["onnxruntime"]
    with pytest.raises(ValueError, match="unknown"):
        time_runtimes({"m": a}, 2, 32, "float32", torch.device("cpu"), 1,
                      runtimes=("tensorrt",))
