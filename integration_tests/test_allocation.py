"""Search measures against direct computations, and the global allocation: its curves, its
solver against brute force, its budgets and thresholds, its cost accounting (real timm
ViTs with random weights and the committed demo teacher, real digits images)."""

from __future__ import annotations

import copy
import itertools
import json
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import digit_images, small_vit

import amp_plugin as amp
from amp_plugin.run.recipe import RECIPES_DIR, RecipeError, load_recipe
from amp_plugin.run.report import CURVES_PLOT
from amp_plugin.search.allocation import GlobalAllocation, GlobalSearch, coarse_sizes
from amp_plugin.search.budget import SizeModel, Target
from amp_plugin.search.greedy import EntropyEval, SearchState, keep_order
from amp_plugin.search.knapsack import closest_weight, least_cost, least_weight
from amp_plugin.search.pruner import masked_or_sliced

INV_T = 20.0


# ---- direct computations, written independently of the library ---------------------------
def direct_kl(orig: torch.Tensor, cand: torch.Tensor) -> float:
    a, b = F.normalize(orig.double(), dim=-1), F.normalize(cand.double(), dim=-1)
    p, q = torch.softmax(INV_T * a @ a.T, 1), torch.softmax(INV_T * b @ b.T, 1)
    return float((p * (p.log() - q.log())).sum(1).mean())


def direct_cosine(orig: torch.Tensor, cand: torch.Tensor) -> float:
    return float(1 - F.cosine_similarity(orig.double(), cand.double(), dim=-1).mean())


def direct_entropy(orig: torch.Tensor, cand: torch.Tensor) -> float:
    b = F.normalize(cand.double(), dim=-1)
    p = torch.softmax(INV_T * b @ b.T, 1)
    return float(-(p * p.log()).sum(1).mean())


DIRECT = {"kl": direct_kl, "cosine": direct_cosine, "entropy_rise": direct_entropy}


def features(model, x):
    tower, adapter = amp.vision_tower(model)
    with torch.no_grad():
        return adapter.features(tower, x)


def pruned_copy(model, scores, sizes: dict[str, int]):
    """A physically pruned copy keeping each MLP's top-scored `sizes[name]` neurons."""
    m = copy.deepcopy(model)
    tower, _ = amp.vision_tower(m)
    keep = {n: keep_order(scores[n])[:s].sort().values for n, s in sizes.items()}
    amp.prune_mlps(tower, torch.zeros(1, 3, 32, 32), keep)
    return m


def direct(measure: str, model, pruned, batches) -> float:
    return sum(DIRECT[measure](features(model, x), features(pruned, x))
               for x in batches) / len(batches)


@pytest.fixture(scope="module")
def vit3():
    model = small_vit(depth=3)
    x = digit_images(160)
    imp = amp.AMPImportance(INV_T, show_progress=False)
    scores = imp.accumulate(model, [x[:64]])
    return model, scores, [x[64:96], x[96:128], x[128:160]]


def _imp(scores, model):
    return amp.AMPImportance(INV_T, show_progress=False).load_scores(scores, model)


# ---- measures --------------------------------------------------------------------------------
@pytest.mark.parametrize("measure", amp.list_measures())
def test_measure_equals_direct_computation(vit3, measure):
    model, scores, val = vit3
    tower, _ = amp.vision_tower(model)
    views = amp.find_mlps(tower)
    evaluate = EntropyEval(model, _imp(scores, model), val, views, show_progress=False,
                           measure=measure)
    name = "blocks.1.mlp"
    with masked_or_sliced(tower, views[name], keep_order(scores[name])[:40]):
        value, entropy = evaluate.values(name, entropy=True)
        first_batch = evaluate(name, batches=1)
    pruned = pruned_copy(model, scores, {name: 40})
    assert value == pytest.approx(direct(measure, model, pruned, val), abs=2e-6)
    assert first_batch == pytest.approx(direct(measure, model, pruned, val[:1]), abs=2e-6)
    assert entropy == pytest.approx(direct("entropy_rise", model, pruned, val), abs=2e-6)
    # the cost is counted: 2 blocks x 96 images, then 2 blocks x 32 images, after the
    # original's references (block 2 from its cached states); the cache filling pass ran
    # blocks 0-1 for the states entering blocks 1 and 2
    assert evaluate.block_forwards - (96 if "original" in evaluate.measure.needs
                                      else 0) == 2 * 96 + 2 * 32
    assert evaluate.cache.block_forwards == 2 * 96


def test_default_measure_is_the_authors_rule(vit3):
    model, scores, val = vit3
    results = [amp.AMPPruner(copy.deepcopy(model), val[0][:1], _imp(scores, model), val, 2e-3,
                             show_progress=False, **kw).step()
               for kw in ({}, {"measure": "entropy_rise", "allocation": "greedy"})]
    assert results[0].hidden_sizes == results[1].hidden_sizes
    assert results[0].trace == results[1].trace and results[0].entropy == results[1].entropy


def test_greedy_search_on_kl_reports_both_values(vit3):
    model, scores, val = vit3
    pruned = copy.deepcopy(model)
    result = amp.AMPPruner(pruned, val[0][:1], _imp(scores, model), val, 5e-3, max_steps=4,
                           measure="kl", show_progress=False).step()
    assert result.trace and all(t.accepted == (t.entropy - t.reference <= 5e-3)
                                for t in result.trace)
    values = result.extra["measure"]
    assert values["name"] == "kl" and values["before"] == 0.0
    assert values["final"] == pytest.approx(direct("kl", model, pruned, val), abs=2e-6)
    assert result.entropy["before"] == pytest.approx(direct("entropy_rise", model, model, val),
                                                     abs=2e-6)
    assert result.entropy["after"] == pytest.approx(direct("entropy_rise", model, pruned, val),
                                                    abs=2e-6)


# ---- the solver ------------------------------------------------------------------------------
def test_knapsack_equals_brute_force():
    rng = random.Random(0)
    for _ in range(150):
        groups = [[(rng.randint(0, 12) * 6, rng.uniform(-1, 3)) for _ in range(rng.randint(1, 4))]
                  for _ in range(3)]
        combos = [(sum(o[0] for o in c), sum(o[1] for o in c))
                  for c in itertools.product(*groups)]
        lo = rng.randint(0, 60)
        hi = lo + rng.randint(0, 30)
        inside = [c for w, c in combos if lo <= w <= hi]
        sol = least_cost(groups, lo, hi)
        assert (sol is None) == (not inside)
        if sol is not None:
            assert sol.exact and sol.cost == pytest.approx(min(inside))
            assert lo <= sol.weight <= hi
        limit = rng.uniform(-1, 5)
        under = [w for w, c in combos if c <= limit]
        sol = least_weight(groups, limit)
        assert (sol is None) == (not under)
        if sol is not None:
            assert sol.weight == min(under) and sol.cost <= limit
        goal = rng.uniform(0, 80)
        near = min(abs(w - goal) for w, _ in combos)
        assert abs(closest_weight(groups, goal).weight - goal) == pytest.approx(near)
    # a table too large for max_states: rounded weights, with the error bound it states
    groups = [[(w * 7 + 3, float(c)) for c, w in enumerate(range(0, 40, 3))] for _ in range(3)]
    sol = least_cost(groups, 200, 260, max_states=50)
    assert not sol.exact and sol.unit > 1 and sol.weight_error == 3 * sol.unit / 2
    assert 200 - sol.weight_error <= sol.weight <= 260 + sol.weight_error


def test_allocation_equals_brute_force_on_three_blocks(vit3):
    """The sizes solved from the measured curves are the best of every combination of the
    measured sizes: least summed KL within the budget window, fewest MLP parameters under
    the threshold."""
    model, scores, val = vit3
    m = copy.deepcopy(model)
    tower, _ = amp.vision_tower(m)
    views = amp.find_mlps(tower)
    evaluate = EntropyEval(m, _imp(scores, m), val, views, show_progress=False, measure="kl")
    sizes = SizeModel(tower, views, val[0][:1])
    settings = GlobalAllocation(grid=16, coarse_points=4, refine_rounds=0,
                                max_verifications=1)
    search = GlobalSearch(views, scores, evaluate,
                          lambda n, v, k: masked_or_sliced(tower, v, k), sizes, settings)
    assert coarse_sizes(256, 16, 4) == [64, 128, 192]
    names = list(views)
    for value in (0.25, 0.4, 0.6, 0.8):
        target = Target("mlp_params", value, tolerance=0.1)
        record = search.run(0.0, target).record
        curves = record["curves"]
        options = [[(s, d) for s, d in zip(curves[n]["sizes"], curves[n]["distortion"],
                                           strict=True)] + [(256, 0.0)] for n in names]
        assert all(len(o) == 4 for o in options)  # 3 measured + the full size
        goal = target.goal(sizes.before["mlp_params"])
        best = min((sum(d for _, d in c), c) for c in itertools.product(*options)
                   if abs(sizes.at("mlp_params", {n: s for n, (s, _) in zip(names, c,
                                                                            strict=True)})
                          - goal) <= 0.1 * goal)
        assert record["interpolated"] == []  # sizes on the measured grid only
        assert record["predicted"] == pytest.approx(best[0], abs=1e-12)
        assert record["hidden_sizes"] == {n: s for n, (s, _) in zip(names, best[1],
                                                                    strict=True)}
        assert record["reached"] and record["solver"]["exact"]
    for limit in (0.005, 0.02, 0.1):
        record = search.run(limit, None).record
        check = record["verifications"][0]
        assert check["limit"] == limit
        fewest = min(sizes.at("mlp_params", {n: s for n, (s, _) in zip(names, c, strict=True)})
                     for c in itertools.product(*options) if sum(d for _, d in c) <= limit)
        assert check["achieved"] == fewest and check["predicted"] <= limit


# ---- the allocation end to end ---------------------------------------------------------------
def test_global_budget_prunes_to_target_and_verifies(vit3):
    model, scores, val = vit3
    pruned = copy.deepcopy(model)
    settings = GlobalAllocation(coarse_points=4, refine_rounds=3, curve_images=64)
    result = amp.AMPPruner(pruned, val[0][:1], _imp(scores, model), val, 0.0, measure="kl",
                           allocation=settings, target={"mlp_params": 0.45},
                           show_progress=False).step()
    alloc = result.extra["allocation"]
    kept = result.mlp_params["after"] / result.mlp_params["before"]
    assert abs(kept - 0.45) <= 0.01 * 0.45 and alloc["reached"]
    assert alloc["achieved"] == result.mlp_params["after"]  # the size model is exact
    assert alloc["hidden_sizes"] == result.hidden_sizes
    # the verified value is the pruned model's KL to the original on every image
    assert alloc["verified"] == pytest.approx(direct("kl", model, pruned, val), abs=2e-6)
    assert result.entropy["after"] == pytest.approx(direct("entropy_rise", model, pruned, val),
                                                    abs=2e-6)
    # a curve point is that block alone cut, measured on the first 64 images (2 batches)
    name, size = "blocks.0.mlp", alloc["curves"]["blocks.0.mlp"]["sizes"][0]
    alone = pruned_copy(model, scores, {name: size})
    assert alloc["curves"][name]["distortion"][0] == pytest.approx(
        direct("kl", model, alone, val[:2]), abs=2e-6)
    assert alloc["curve_batches"] == 2 and alloc["validation_batches"] == 3
    # image-block forwards: a point of block l runs blocks l..2 over the curve images; the
    # original's references, its values and each verification are counted too
    points = sum((3 - c["index"]) * len(c["sizes"]) for c in alloc["curves"].values())
    forwards = alloc["image_block_forwards"]
    assert forwards["curves"] == points * 64 + 1 * 96 + 1 * 64
    assert forwards["verification"] == 3 * 96 * len(alloc["verifications"])
    assert forwards["cache"] == 2 * 96
    assert result.extra["image_block_forwards"] == forwards["total"] + 1 * 96


def test_global_threshold_keeps_the_verified_distortion_under_it(vit3):
    model, scores, val = vit3
    pruned = copy.deepcopy(model)
    result = amp.AMPPruner(pruned, val[0][:1], _imp(scores, model), val, 0.02, measure="kl",
                           allocation=GlobalAllocation(coarse_points=4, refine_rounds=2),
                           show_progress=False).step()
    alloc = result.extra["allocation"]
    assert alloc["mode"] == "threshold" and alloc["reached"]
    assert alloc["verified"] <= 0.02
    assert direct("kl", model, pruned, val) == pytest.approx(alloc["verified"], abs=2e-6)
    assert result.mlp_params["after"] < result.mlp_params["before"]
    for check in alloc["verifications"]:
        assert check["predicted"] <= check["limit"]
    limits = [c["limit"] for c in alloc["verifications"]]
    assert limits == sorted(limits, reverse=True) and limits[0] == 0.02


def test_bad_settings_are_refused_before_any_work(vit3):
    model, scores, val = vit3
    imp = _imp(scores, model)
    with pytest.raises(ValueError, match="unknown search measure 'nope'"):
        amp.AMPPruner(model, val[0][:1], imp, val, 0.0, measure="nope")
    with pytest.raises(ValueError, match="allocation must be one of greedy, global"):
        amp.AMPPruner(model, val[0][:1], imp, val, 0.0, allocation="globl")
    with pytest.raises(ValueError, match="unknown setting 'points'"):
        amp.AMPPruner(model, val[0][:1], imp, val, 0.0, allocation={"points": 3})
    with pytest.raises(ValueError, match="coarse_points must be a positive integer"):
        GlobalAllocation(coarse_points=0)
    with pytest.raises(ValueError, match="not resumable"):
        amp.AMPPruner(model, val[0][:1], imp, val, 0.0, allocation="global",
                      resume=SearchState())
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"cannot be met: each MLP keeps at least 8 neurons"):
        amp.AMPPruner(model, val[0][:1], imp, val, 0.0, allocation="global",
                      target={"mlp_params": 0.01}, show_progress=False).step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_recipe_search_section_errors():
    with pytest.raises(RecipeError, match=r"amp.search.measure: Input should be 'entropy_rise'"):
        load_recipe("demo_digits", {"amp.search.measure": "kll"})
    with pytest.raises(RecipeError, match="curve_images applies to allocation: global"):
        load_recipe("demo_digits", {"amp.search.curve_images": 256})
    with pytest.raises(RecipeError, match=r"amp.search.curve_images: 100 is fewer than one batch"):
        load_recipe("demo_digits", {"amp.search.allocation": "global",
                                    "amp.search.curve_images": 100})
    with pytest.raises(RecipeError, match=r"curve_images: 1024 is more than data.val_images"):
        load_recipe("demo_digits", {"amp.search.allocation": "global",
                                    "amp.search.curve_images": 1024})
    r = load_recipe("demo_digits", {"amp.search.allocation": "global",
                                    "amp.search.measure": "kl", "amp.target.mlp_params": 0.3})
    assert r.amp.search.allocation_spec() == {
        "grid": 8, "coarse_points": 8, "refine_rounds": 8, "curve_images": None,
        "max_verifications": 3}
    # a recipe written out in full (as a run directory keeps it) repeats the defaults
    for recipe in (r, load_recipe("demo_digits")):
        assert amp.Recipe.model_validate(recipe.model_dump()).model_dump() == recipe.model_dump()


# ---- budgets on the committed demo teacher ---------------------------------------------------
@pytest.fixture(scope="module")
def demo():
    teacher = amp.load_pruned(RECIPES_DIR / "teachers" / "demo_digits").eval()
    x = digit_images(512, offset=600)
    imp = amp.AMPImportance(INV_T, show_progress=False)
    scores = imp.accumulate(teacher, [x[:128], x[128:256]])
    return teacher, scores, [x[256:384], x[384:]]


def test_demo_teacher_budgets_are_met(demo):
    """Curves measured once, the allocation solved for each budget: the physically pruned
    teacher keeps the target +- 1% of it (so within +- 1 point of MLP parameters)."""
    teacher, scores, val = demo
    model = copy.deepcopy(teacher)
    tower, _ = amp.vision_tower(model)
    views = amp.find_mlps(tower)
    evaluate = EntropyEval(model, _imp(scores, model), val, views, show_progress=False,
                           measure="kl")
    search = GlobalSearch(views, scores, evaluate,
                          lambda n, v, k: masked_or_sliced(tower, v, k),
                          SizeModel(tower, views, val[0][:1]),
                          GlobalAllocation(curve_images=128))
    before = sum(v.num_params() for v in views.values())
    for value in (0.2, 0.3, 0.4, 0.5, 0.7):
        out = search.run(0.0, Target("mlp_params", value))
        pruned = pruned_copy(teacher, scores, out.hidden_sizes)
        after = sum(v.num_params() for v in amp.find_mlps(amp.vision_tower(pruned)[0]).values())
        assert abs(after / before - value) <= 0.01 * value, (value, out.hidden_sizes)
        assert out.record["reached"] and out.record["achieved"] == after
        assert out.record["verified"] == pytest.approx(direct("kl", teacher, pruned, val),
                                                       abs=2e-6)


def test_cli_run_with_global_allocation(tmp_path):
    """`amp run --set amp.search.allocation=global --set amp.search.measure=kl --set
    amp.target.mlp_params=0.3` on the demo (fewer images): the target is met, report.json
    records the curves and the allocation, and `amp report` plots the curves."""
    run = tmp_path / "run"
    sets = {"amp.search.allocation": "global", "amp.search.measure": "kl",
            "amp.target.mlp_params": 0.3, "data.calib_images": 256, "data.val_images": 256,
            "amp.search.curve_images": 128}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    out = subprocess.run([sys.executable, "-m", "amp_cli.app", "run", "demo_digits", "--out",
                          str(run), "--no-progress", *args, "--stage", "score", "--stage",
                          "prune", "--stage", "report"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "global allocation by kl: predicted" in out.stdout
    report = json.loads((run / "report.json").read_text())
    kept = report["mlp_params"]["after"] / report["mlp_params"]["before"]
    assert abs(kept - 0.3) <= 0.01 * 0.3
    alloc = report["allocation"]
    assert report["search"] == {"measure": "kl", "allocation": "global"}
    assert alloc["reached"] and alloc["hidden_sizes"] == report["hidden_sizes"]
    assert set(alloc["curves"]) == {f"blocks.{i}.mlp" for i in range(4)}
    assert alloc["curve_batches"] == 1 and alloc["validation_batches"] == 2
    assert "global allocation by kl" in out.stdout
    png = run / "plots" / CURVES_PLOT
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png.unlink()
    again = subprocess.run([sys.executable, "-m", "amp_cli.app", "report", str(run)],
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
