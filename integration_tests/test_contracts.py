"""Contract tests parametrized over the registries (timm's `list_models()` habit):
registering an adapter, MLP kind, criterion, data source or eval task is enough to get
it tested here, with the small example each registration provides."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import digit_images, small_vit
from rich.console import Console
from torch import nn

import amp_plugin as amp
from amp_plugin.config import DataConfig, EvalConfig
from amp_plugin.core.mlp import mlp_example
from amp_plugin.data import get_source
from amp_plugin.evaluate import EvalContext, evaluate_models, get_task
from amp_plugin.families.open_clip import OpenClipCLIP
from amp_plugin.run.report import render_table
from amp_plugin.search.greedy import EntropyEval, keep_order
from amp_plugin.search.measures import NEEDS, measure_class
from amp_plugin.search.pruner import masked_or_sliced


def _clip() -> nn.Module:
    torch.manual_seed(0)
    return amp.create_model(OpenClipCLIP.example).eval()


def _halved(model: nn.Module) -> nn.Module:
    pruned = copy.deepcopy(model)
    tower, _ = amp.vision_tower(pruned)
    keep = {n: torch.arange(0, v.hidden, 2) for n, v in amp.find_mlps(tower).items()}
    amp.prune_mlps(tower, torch.zeros(1, 3, 32, 32), keep)
    return pruned


# ---- model families ------------------------------------------------------------------------
@pytest.mark.parametrize("adapter", amp.list_adapters(), ids=lambda a: a.family)
def test_adapter_contract(adapter, tmp_path):
    assert adapter.example is not None, f"adapter {adapter.family} gives no example spec"
    torch.manual_seed(0)
    model = amp.create_model(adapter.example).eval()
    assert adapter.matches(model)
    tower, inner = amp.vision_tower(model)
    x = digit_images(96)
    with torch.no_grad():
        state = inner.embed(tower, x[:8])
        for i in range(len(inner.blocks(tower))):
            state = inner.run_block(tower, i, state)
        blockwise = inner.head(tower, state)
        torch.testing.assert_close(blockwise, inner.features(tower, x[:8]), rtol=1e-4,
                                   atol=1e-5)
        pooled, patch = inner.final_tokens(tower, x[:8])
    assert pooled.shape[0] == patch.shape[0] == 8 and patch.dim() == 3
    views = amp.find_mlps(tower)
    assert views and all(v.kind in amp.list_mlp_kinds() for v in views.values())

    imp = amp.AMPImportance(20.0, show_progress=False)
    scores = imp.accumulate(model, [x[:32]])
    assert set(scores) == set(views)
    assert all(torch.isfinite(s).all() and len(s) == views[n].hidden for n, s in scores.items())
    result = amp.AMPPruner(model, x[:1], imp, [x[32:64], x[64:]], threshold=5e-3, max_steps=3,
                           show_progress=False).step()
    assert result.hidden_sizes == {n: v.hidden for n, v in amp.find_mlps(tower).items()}
    with torch.no_grad():
        want = inner.features(tower, x[:8])
    amp.save_pruned(model, tmp_path / "m")
    loaded = amp.load_pruned(tmp_path / "m")
    t2, a2 = amp.vision_tower(loaded)
    with torch.no_grad():
        torch.testing.assert_close(a2.features(t2, x[:8]), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", amp.list_mlp_kinds())
def test_mlp_kind_contract(kind):
    torch.manual_seed(0)
    mlp = mlp_example(kind, dim=16, hidden=32)
    assert mlp is not None, f"MLP kind {kind} gives no example"
    net = nn.Sequential(mlp).eval()
    types = [type(m) for m in net.modules()]
    views = amp.find_mlps(net)
    assert [v.kind for v in views.values()] == [kind] and views["0"].hidden == 32
    assert [type(m) for m in net.modules()] == types  # find_mlps leaves the model alone
    view = views["0"]
    x = torch.randn(2, 5, 16)
    keep = torch.arange(0, 32, 3)
    with torch.no_grad():
        sliced = view.sliced_copy(keep)(x)
        with masked_or_sliced(net, view, keep):
            trial = net(x)
        torch.testing.assert_close(trial, sliced, rtol=0, atol=1e-6)
        assert view.num_params_at(len(keep)) == amp.find_mlps(
            nn.Sequential(view.sliced_copy(keep)))["0"].num_params()
        amp.prune_mlps(net, x, {"0": keep})
        assert amp.find_mlps(net)["0"].hidden == len(keep)
        torch.testing.assert_close(net(x), sliced, rtol=0, atol=1e-6)


# ---- criteria ------------------------------------------------------------------------------
EXTRAS = {"nothing": [None], "text": ["text"], "labels": ["labels"],
          "text_or_labels": ["text", "labels"]}


@pytest.mark.parametrize("name", amp.list_criteria())
def test_criterion_contract(name):
    info = amp.criterion_info(name)
    loss = amp.make_criterion(name, 10.0)
    g = torch.Generator().manual_seed(0)
    for extra in EXTRAS[info.needs]:
        f = torch.randn(8, 16, generator=g, requires_grad=True)
        batch_extra = {None: None, "text": torch.randn(8, 16, generator=g),
                       "labels": torch.randint(0, 16, (8,), generator=g)}[extra]
        value = loss(f, batch_extra)
        assert value.dim() == 0 and value.dtype == torch.float32 and torch.isfinite(value)
        value.backward()
        assert f.grad is not None and torch.isfinite(f.grad).all()
        assert info.projects(extra == "text") in (True, False)
    if info.needs != "nothing":
        with pytest.raises(ValueError, match=name):
            loss(torch.randn(8, 16), None)


# ---- search measures -----------------------------------------------------------------------
@pytest.mark.parametrize("name", amp.list_measures())
def test_search_measure_contract(name):
    cls = measure_class(name)
    assert cls.name == name and cls.description and cls.needs <= NEEDS
    model = small_vit(depth=2)
    tower, _ = amp.vision_tower(model)
    x = digit_images(96)
    imp = amp.AMPImportance(20.0, show_progress=False)
    scores = imp.accumulate(model, [x[:32]])
    views = amp.find_mlps(tower)
    first, last = list(views)
    evaluate = EntropyEval(copy.deepcopy(model), imp, [x[32:64], x[64:]], views,
                           show_progress=False, measure=name)
    base = evaluate(last)
    assert isinstance(base, float) and torch.isfinite(torch.tensor(base))
    if "original" in cls.needs:  # compared with the original: 0 on the original itself
        assert abs(base) < 1e-6 and len(evaluate.references) == 2
    view = amp.find_mlps(amp.vision_tower(evaluate.model)[0])[first]
    with masked_or_sliced(evaluate.tower, view, keep_order(scores[first])[:4]):
        cut = evaluate(first)
    assert torch.isfinite(torch.tensor(cut)) and cut != base
    if "original" in cls.needs:
        assert cut > base
    # the global allocation and the greedy search both run on it
    budget = amp.AMPPruner(copy.deepcopy(model), x[:1], imp, [x[32:64], x[64:]], 0.0,
                           measure=name, target={"mlp_params": 0.5, "tolerance": 0.02},
                           allocation=amp.GlobalAllocation(coarse_points=4, refine_rounds=1),
                           show_progress=False).step()
    alloc = budget.extra["allocation"]
    assert alloc["reached"] and alloc["measure"] == name
    assert abs(budget.mlp_params["after"] / budget.mlp_params["before"] - 0.5) <= 0.01
    greedy = amp.AMPPruner(copy.deepcopy(model), x[:1], imp, [x[32:64], x[64:]], 1e-3,
                           measure=name, max_steps=3, show_progress=False).step()
    for t in greedy.trace:  # the greedy rule: the measure rises by at most the threshold
        assert t.accepted == (t.entropy - t.reference <= 1e-3)


# ---- data sources --------------------------------------------------------------------------
@pytest.mark.parametrize("name", amp.list_sources())
def test_data_source_contract(name, tmp_path):
    source = get_source(name)
    data = DataConfig(**source.example(tmp_path))
    model = _clip()
    extras = [None] if "text" not in source.gives else []
    extras += [e for e in ("labels", "text") if e in source.gives]
    for extra in extras:
        calib, val = source.amp_batches(data, 0, extra=extra, model=model,
                                        show_progress=False)
        again, _ = source.amp_batches(data, 0, extra=extra, model=model, show_progress=False)
        images = [b if extra is None else b[0] for b in calib]
        assert sum(len(b) for b in images) == data.calib_images
        assert [len(b if extra is None else b[0]) for b in val] == \
            [data.batch_size] * (data.val_images // data.batch_size)
        assert images[0].shape[1:] == (3, data.image_size, data.image_size)
        first = calib[0] if extra is None else calib[0][0]
        assert torch.equal(first, again[0] if extra is None else again[0][0])  # fixed order
        if extra is not None:
            assert all(len(b[1]) == len(b[0]) for b in calib + val)
    if "labels" in source.gives:
        splits = source.labelled_splits(data, 0)
        assert len(splits["train"].images) == len(splits["train"].labels) > 0
        assert len(splits["test"].images) == len(splits["test"].labels) > 0


# ---- eval tasks ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", amp.list_tasks())
def test_eval_task_contract(name, tmp_path):
    task = get_task(name)
    cfg = EvalConfig(**{"tasks": [name], "batch_size": 64, "max_train": 300, "workers": 0,
                        **task.example(tmp_path)})
    digits = get_source("digits")
    data = DataConfig(**digits.example(tmp_path))
    ctx = EvalContext(data, digits, 0, torch.device("cpu"), tmp_path / "cache",
                      show_progress=False)
    model = _clip()
    results = evaluate_models(cfg, {"teacher": lambda: model, "pruned": lambda: _halved(model)},
                              ctx)
    section = results[task.section()]
    per_role = list(section.values()) if task.per_dataset else [section]
    for entry in per_role:
        assert {"teacher", "pruned"} <= set(entry)
    assert results["models"]["pruned"]["mlp_params"] < results["models"]["teacher"]["mlp_params"]
    rows = task.rows(section)
    assert rows and all(r.label for r in rows)
    console = Console(record=True, width=200)
    console.print(render_table({"name": "contract", **results}))
    text = console.export_text()
    assert all(r.label.splitlines()[0] in text for r in rows)
