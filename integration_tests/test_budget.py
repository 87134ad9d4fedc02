"""Budget mode: the threshold is searched until the pruned model meets a size target."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import digit_images, small_vit

import amp_plugin as amp
from amp_plugin.core.cost import count_flops
from amp_plugin.nni import AMPNNIPruner, apply_nni_masks
from amp_plugin.run.recipe import RecipeError, load_recipe
from amp_plugin.search.budget import Target


@pytest.fixture(scope="module")
def setup():
    model = small_vit(depth=3)
    val = [digit_images(64, offset=64)]
    imp = amp.AMPImportance(20.0, show_progress=False)
    scores = imp.accumulate(model, [digit_images(64)])
    return model, scores, val


def _pruner(setup, threshold, **kw):
    model, scores, val = setup
    m = copy.deepcopy(model)
    imp = amp.AMPImportance(20.0, show_progress=False).load_scores(scores, m)
    return m, amp.AMPPruner(m, val[0][:1], imp, val, threshold, show_progress=False, **kw)


def test_budget_meets_target_and_equals_plain_search(setup):
    _, plain = _pruner(setup, 1e-3)
    goal = plain.step().mlp_params["after"]  # a size AMP reaches at some threshold
    model, pruner = _pruner(setup, 1e-5, target={"mlp_params": goal})
    result = pruner.step()
    budget = result.extra["budget"]
    assert budget["reached"] and budget["message"] == ""
    assert abs(result.mlp_params["after"] - goal) <= 0.01 * goal
    assert result.mlp_params["after"] == budget["achieved"]  # the size model is exact
    assert len(budget["iterations"]) >= 2 and budget["iterations"][0]["threshold"] == 1e-5
    assert budget["threshold"] == result.threshold
    chosen = [it for it in budget["iterations"] if it["threshold"] == result.threshold]
    assert chosen[0]["hidden_sizes"] == result.hidden_sizes
    # the sizes are those of a plain AMP search at the threshold found
    again, pruner = _pruner(setup, result.threshold)
    assert pruner.step().hidden_sizes == result.hidden_sizes
    x = digit_images(8, offset=300)
    with torch.no_grad():
        torch.testing.assert_close(model(x), again(x))


def test_flops_target_counts_what_the_flop_counter_counts(setup):
    model, pruner = _pruner(setup, 1e-3, target={"flops": 0.85, "max_searches": 2})
    result = pruner.step()
    budget = result.extra["budget"]
    assert budget["target"]["measure"] == "flops"
    assert result.flops["after"] == pytest.approx(budget["achieved"], abs=1)
    assert count_flops(model, digit_images(1)) == result.flops["after"]


def test_unreachable_targets_say_so_with_the_closest_size(setup):
    model, pruner = _pruner(setup, 1e-3, target={"mlp_params": 0.001})
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"cannot be met.*closest reachable: 1,740 \(1.8%\)"):
        pruner.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # this random-weight ViT loses entropy when blocks are cut: even threshold 0 prunes
    _, pruner = _pruner(setup, 1e-6, target={"mlp_params": 0.95})
    budget = pruner.step().extra["budget"]
    assert not budget["reached"] and "closest reachable" in budget["message"]
    assert budget["iterations"][-1]["threshold"] == 0.0


def test_target_spec_errors():
    with pytest.raises(ValueError, match="exactly one of mlp_params, params, flops"):
        Target.parse({"mlp_params": 0.5, "flops": 0.5})
    with pytest.raises(ValueError, match="tolerance"):
        Target.parse({"params": 0.5, "tolerance": 2})
    with pytest.raises(RecipeError, match="amp.target: Value error, exactly one of"):
        load_recipe("demo_digits", {"amp.target": {"mlp_params": 0.5, "params": 0.5}})


def test_nni_budget_equals_native_budget(setup):
    model, scores, val = setup
    target = {"mlp_params": 0.5, "tolerance": 0.03, "max_searches": 2}
    _, pruner = _pruner(setup, 1e-4, target=target)
    native = pruner.step()
    dense = copy.deepcopy(model)
    nni = AMPNNIPruner(dense, [{"op_names_re": [r".*\.mlp$"]}], val_batches=val,
                       threshold=1e-4, target=target,
                       importance=amp.AMPImportance(20.0, show_progress=False)
                       .load_scores(scores), show_progress=False)
    _, masks = nni.compress()
    nni.unwrap_model()
    sizes = apply_nni_masks(dense, masks, val[0][:1])
    assert sizes == native.hidden_sizes == nni.search.hidden_sizes
    assert nni.search.extra["budget"]["iterations"] == native.extra["budget"]["iterations"]


def test_plan_estimates_the_budget_search():
    p = amp.plan(load_recipe("demo_digits", {"amp.target": {"mlp_params": 0.5}}))
    b, v = p["search"]["budget"], p["search"]["validation"]
    assert b["max_searches"] == 12
    per = v["full_forward_equivalents_cached"] - 1
    assert b["full_forward_equivalents_at_most"] == pytest.approx(1 + 12 * per, abs=0.1)
