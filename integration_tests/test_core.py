"""Core behaviour: criterion, scores, physical pruning, search, Torch-Pruning pruners."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch_pruning as tp
from conftest import digit_images, small_open_clip, small_vit

import amp_plugin as amp
from amp_plugin.core.tp import build_dependency_graph, prune_mlp
from amp_plugin.search.greedy import keep_order


# ---- criterion ---------------------------------------------------------------------------
def _entropy_by_hand(rows, cols, t):
    total = 0.0
    for r in rows:
        logits = [t * sum(a * b for a, b in zip(r, c)) for c in cols]
        m = max(logits)
        z = sum(math.exp(v - m) for v in logits)
        p = [math.exp(v - m) / z for v in logits]
        total += -sum(q * math.log(q) for q in p)
    return total / len(rows)


def _unit(v):
    n = math.sqrt(sum(a * a for a in v))
    return [a / n for a in v]


def test_entropy_loss_matches_hand_computation():
    feats = [[1.0, 2.0, 0.5], [0.3, -1.0, 2.0], [2.0, 0.1, 0.1], [-1.0, -1.0, 1.0]]
    expected = _entropy_by_hand([_unit(f) for f in feats], [_unit(f) for f in feats], 20.0)
    got = amp.entropy_loss(torch.tensor(feats), 20.0)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_clip_entropy_loss_matches_hand_computation():
    img = [[1.0, 0.0, 0.5], [0.2, 1.0, 0.0], [0.0, 0.3, 1.0]]
    txt = [[0.9, 0.1, 0.4], [0.0, 1.0, 0.2], [0.5, 0.5, 0.5]]
    ni, nt = [_unit(v) for v in img], [_unit(v) for v in txt]
    expected = 0.5 * (_entropy_by_hand(ni, nt, 15.0) + _entropy_by_hand(nt, ni, 15.0))
    t = torch.tensor(txt, requires_grad=True)
    i = torch.tensor(img, requires_grad=True)
    got = amp.clip_entropy_loss(i, t, 15.0)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    got.backward()
    assert t.grad is None and i.grad is not None  # text features carry no gradient


def test_one_hot_loss_is_cross_entropy():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
    labels = torch.tensor([0, 1])
    expected = -0.5 * (torch.log_softmax(logits, 1)[0, 0] + torch.log_softmax(logits, 1)[1, 1])
    assert amp.one_hot_loss(logits, labels, 1.0).item() == pytest.approx(expected.item(), rel=1e-6)


# ---- scores ------------------------------------------------------------------------------
def _direct_scores(model, batches, t):
    """The section-2 formula by plain autograd: keep every hidden activation, differentiate."""
    tower, adapter = amp.vision_tower(model)
    views = amp.find_mlps(tower)
    totals = {n: torch.zeros(v.hidden, dtype=torch.float64) for n, v in views.items()}
    for x in batches:
        acts = {}

        def keep(name):
            def hook(_m, args):
                args[0].retain_grad()
                acts[name] = args[0]
            return hook
        hooks = [v.output.register_forward_pre_hook(keep(n)) for n, v in views.items()]
        feats = adapter.features(tower, x.clone().requires_grad_(True))
        for h in hooks:
            h.remove()
        amp.entropy_loss(feats, t).backward()
        for n, a in acts.items():
            per_image = (a * a.grad).sum(dim=1).abs()  # tokens summed first, then |.|
            totals[n] += per_image.mean(dim=0).double()
    model.zero_grad(set_to_none=True)
    return {n: (s / len(batches)).float() for n, s in totals.items()}


@pytest.mark.parametrize("kind", ["mlp", "glu", "swiglu", "open_clip"])
def test_scores_equal_direct_autograd(kind):
    model = small_open_clip() if kind == "open_clip" else small_vit(kind)
    size = 224 if kind == "open_clip" else 32
    batches = [digit_images(6, size), digit_images(6, size, offset=6)]
    imp = amp.AMPImportance(inv_temperature=20.0, show_progress=False)
    scores = imp.accumulate(model, batches)
    direct = _direct_scores(model, batches, 20.0)
    assert scores.keys() == direct.keys()
    for n in scores:
        torch.testing.assert_close(scores[n], direct[n], rtol=1e-4, atol=1e-9)
    assert all(p.grad is None for p in model.parameters())  # no parameter gradients kept
    assert all(p.requires_grad for p in model.parameters())  # and flags restored


# ---- physical pruning vs masking ---------------------------------------------------------
def _masked_output(model, keep, x):
    tower, adapter = amp.vision_tower(model)
    hooks = []
    for n, v in amp.find_mlps(tower).items():
        mask = torch.zeros(v.hidden)
        mask[keep[n]] = 1
        hooks.append(v.output.register_forward_pre_hook(lambda m, a, mask=mask: (a[0] * mask,)))
    with torch.no_grad():
        out = adapter.features(tower, x)
    for h in hooks:
        h.remove()
    return out


@pytest.mark.parametrize("kind", ["mlp", "glu", "swiglu", "open_clip"])
def test_physical_pruning_equals_masking(kind):
    model = small_open_clip() if kind == "open_clip" else small_vit(kind)
    x = digit_images(4, 224 if kind == "open_clip" else 32)
    tower, _ = amp.vision_tower(model)
    g = torch.Generator().manual_seed(1)
    keep = {n: torch.randperm(v.hidden, generator=g)[: v.hidden // 3].sort().values
            for n, v in amp.find_mlps(tower).items()}
    expected = _masked_output(model, keep, x)
    sizes = amp.prune_mlps(tower, x[:1], keep)
    assert sizes == {n: len(k) for n, k in keep.items()}
    with torch.no_grad():
        got = amp.vision_tower(model)[1].features(tower, x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_hidden_norm_mlp_is_sliced_not_masked():
    """A norm over the hidden dim (EVA sub-LN) makes masking inexact; slicing is exact."""
    from timm.layers import Mlp

    torch.manual_seed(0)
    mlp = Mlp(16, 48, norm_layer=torch.nn.LayerNorm)
    view = amp.find_mlps(torch.nn.Sequential(mlp))["0"]
    assert not view.exact_masking
    keep = torch.arange(0, 48, 2)
    x = torch.randn(2, 5, 16)
    sliced = view.sliced_copy(keep)
    dg_model = torch.nn.Sequential(copy.deepcopy(mlp))
    dg = build_dependency_graph(dg_model, x)
    prune_mlp(dg, amp.find_mlps(dg_model)["0"], keep)
    with torch.no_grad():
        torch.testing.assert_close(dg_model(x), sliced(x))
        assert mlp.fc2.in_features == 48  # the original is untouched


# ---- the search against a plain implementation of section 3 ------------------------------
def _reference_sizes(model, scores, val, threshold, max_steps=6, t=20.0):
    """docs/algorithm.md section 3 written plainly: full forward for every trial, masks."""
    tower, adapter = amp.vision_tower(model)
    views = list(amp.find_mlps(tower).items())
    keep = {n: torch.arange(v.hidden) for n, v in views}

    def e_val():
        hooks = []
        for n, v in views:
            m = torch.zeros(v.hidden)
            m[keep[n]] = 1
            hooks.append(v.output.register_forward_pre_hook(lambda mod, a, m=m: (a[0] * m,)))
        with torch.no_grad():
            e = sum(amp.entropy_loss(adapter.features(tower, x), t).item() for x in val)
        for h in hooks:
            h.remove()
        return e / len(val)

    e_prev = None
    for n, v in reversed(views):
        if e_prev is None:
            e_prev = e_val()
        order = torch.sort(scores[n], descending=True, stable=True).indices
        lo, hi, best, e_best = 0, v.hidden, v.hidden, None
        for _ in range(max_steps):
            mid = (lo + hi) // 2
            keep[n] = order[:mid]
            e_mid = e_val()
            if e_mid - e_prev <= threshold:
                hi, best, e_best = mid, mid, e_mid
            else:
                lo = mid
        keep[n] = order[:best]
        e_prev = e_best
    return {n: len(k) for n, k in keep.items()}


@pytest.mark.parametrize("kind,seed,threshold", [
    ("mlp", 0, 2e-3), ("mlp", 1, 1e-2), ("glu", 2, 2e-3), ("swiglu", 3, 5e-3)])
def test_search_matches_reference_procedure(kind, seed, threshold):
    model = small_vit(kind, seed=seed)
    calib = [digit_images(16, offset=100 + 16 * i) for i in range(2)]
    val = [digit_images(16, offset=16 * i) for i in range(3)]
    imp = amp.AMPImportance(inv_temperature=20.0, show_progress=False)
    scores = imp.accumulate(model, calib)
    expected = _reference_sizes(copy.deepcopy(model), scores, val, threshold)
    result = amp.AMPPruner(model, val[0][:1], imp, val, threshold, show_progress=False).step()
    assert result.hidden_sizes == expected
    assert result.params["after"] <= result.params["before"]
    with torch.no_grad():
        model(val[0])  # the physically pruned model runs


def test_search_on_disk_cache_gives_same_sizes(tmp_path):
    val = [digit_images(16, offset=16 * i) for i in range(2)]
    sizes = []
    for device_bytes, host_bytes in [(1 << 30, 0), (0, 0)]:
        model = small_vit("mlp", seed=5)
        imp = amp.AMPImportance(inv_temperature=20.0, show_progress=False)
        imp.accumulate(model, val)
        pruner = amp.AMPPruner(model, val[0][:1], imp, val, 3e-3, show_progress=False,
                               cache_device_bytes=device_bytes, cache_host_bytes=host_bytes,
                               cache_dir=str(tmp_path))
        result = pruner.step()
        sizes.append(result.hidden_sizes)
        assert ("disk" in result.cache) == (device_bytes == 0)
    assert sizes[0] == sizes[1]


@pytest.mark.parametrize("tier", ["device", "disk"])
def test_checkpointed_cache_equals_full_cache(tier, tmp_path):
    """A budget of half the full cache: states kept at every sqrt(L)-th block and
    recomputed up to the searched one give the sizes and trace of the full cache."""
    val = [digit_images(16, offset=16 * i) for i in range(2)]
    results = []
    for budget in (1 << 30, None):
        model = small_vit("mlp", seed=3, depth=6)
        imp = amp.AMPImportance(inv_temperature=20.0, show_progress=False)
        imp.accumulate(model, val)
        if budget is None:  # half of what the full cache measured
            budget = results[0].extra["cache_bytes"]["full"] // 2
        limits = ((budget, 0, None, 0) if tier == "device" else (0, 0, str(tmp_path), budget))
        log = []
        results.append(amp.AMPPruner(
            model, val[0][:1], imp, val, 3e-3, show_progress=False, log=log.append,
            cache_device_bytes=limits[0], cache_host_bytes=limits[1], cache_dir=limits[2],
            cache_disk_bytes=limits[3]).step())
    full, ckpt = results
    assert full.cache.startswith("full") and ckpt.cache.startswith("checkpointed at blocks")
    assert (tier in ckpt.cache) and "exceeds the budget" in ckpt.cache and "MiB" in ckpt.cache
    assert "checkpointed" in log[0]
    assert ckpt.hidden_sizes == full.hidden_sizes
    assert [dataclasses.astuple(t) for t in ckpt.trace] == [
        dataclasses.astuple(t) for t in full.trace]
    assert ckpt.entropy == full.entropy
    # 6 blocks: checkpoints at 0, 3 (k = 3) and at most one recomputed block held
    full_bytes = full.extra["cache_bytes"]["full"]
    assert ckpt.extra["cache_bytes"]["full"] == full_bytes
    assert ckpt.extra["cache_bytes"]["peak"] == 3 * full_bytes // 6
    assert ckpt.extra["recomputed_blocks"] == 1 + 2 + 1 + 2  # blocks 1, 2, 4, 5 from 0 and 3
    assert any(s < 256 for s in full.hidden_sizes.values())


def test_cache_below_checkpoint_needs_names_the_budget():
    val = [digit_images(16)]
    model = small_vit("mlp", seed=3, depth=4)
    imp = amp.AMPImportance(inv_temperature=20.0, show_progress=False)
    imp.accumulate(model, val)
    with pytest.raises(MemoryError, match=r"budget of .*\(amp.cache.device_gib"):
        amp.AMPPruner(model, val[0][:1], imp, val, 3e-3, show_progress=False,
                      cache_device_bytes=1000, cache_host_bytes=0, cache_disk_bytes=0).step()


def test_round_to_gives_multiples():
    val = [digit_images(16, offset=16 * i) for i in range(2)]
    model = small_vit("mlp", seed=6)
    imp = amp.AMPImportance(inv_temperature=20.0, show_progress=False)
    imp.accumulate(model, val)
    result = amp.AMPPruner(model, val[0][:1], imp, val, 1e-2, round_to=32,
                           show_progress=False).step()
    assert all(s % 32 == 0 for s in result.hidden_sizes.values())
    assert all(t.size % 32 == 0 for t in result.trace)


def test_keep_order_is_descending_and_stable():
    s = torch.tensor([0.5, 2.0, 0.5, 1.0])
    assert keep_order(s).tolist() == [1, 3, 0, 2]


# ---- Torch-Pruning's own pruner with AMPImportance ---------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "glu"])
def test_base_pruner_with_amp_importance(kind):
    model = small_vit(kind, seed=7)
    x = digit_images(8)
    imp = amp.AMPImportance(inv_temperature=20.0, show_progress=False)
    scores = imp.accumulate(model, [x])
    views = amp.find_mlps(model)
    hidden = {n: v.hidden for n, v in views.items()}
    # Prune only MLP hidden layers: every other root is ignored by AMPImportance (None).
    pruner = tp.pruner.BasePruner(
        model, x[:1], importance=imp, pruning_ratio=0.25,
        customized_pruners=amp.customized_pruners(),
        ignored_layers=[model.head] if hasattr(model.head, "weight") else [])
    kept = {n: set(range(hidden[n])) for n in hidden}
    for group in pruner.step(interactive=True):
        for dep, idxs in group:
            for n, v in views.items():
                if dep.target.module is v.output and dep.handler.__name__ == "prune_in_channels":
                    kept[n] -= set(idxs)
        group.prune()
    for n, v in amp.find_mlps(model).items():
        assert v.hidden == hidden[n] - int(hidden[n] * 0.25)
        lowest = set(torch.argsort(scores[n])[: hidden[n] - v.hidden].tolist())
        assert set(range(hidden[n])) - kept[n] == lowest  # the lowest-scored neurons went
    assert model.embed_dim == 64 and model.blocks[0].attn.qkv.out_features == 192
    with torch.no_grad():
        assert model(x).shape == (8, 64)


# ---- serialization -----------------------------------------------------------------------
def test_save_load_in_fresh_process(tmp_path):
    import subprocess
    import sys

    model = small_vit("glu", seed=8)
    x = digit_images(4)
    keep = {n: torch.arange(0, v.hidden, 3) for n, v in amp.find_mlps(model).items()}
    amp.prune_mlps(model, x[:1], keep)
    with torch.no_grad():
        expected = model(x)
    amp.save_pruned(model, tmp_path / "m")
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import torch, amp_plugin as amp\n"
        f"m = amp.load_pruned(r'{tmp_path / 'm'}')\n"
        f"x = torch.load(r'{tmp_path / 'x.pt'}')\n"
        f"torch.save(m(x).detach(), r'{tmp_path / 'y.pt'}')\n"
        "print({n: v.hidden for n, v in amp.find_mlps(m).items()})\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert "43" in out.stdout  # 128 hidden -> every third neuron kept
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, rtol=0, atol=0)


def test_accumulate_leaves_the_callers_batches_alone(images32):
    """Scoring needs gradients of the activations, not of the caller's tensors."""
    model = small_vit("mlp", seed=1)
    batch = images32[:32].clone()
    imp = amp.AMPImportance(20.0, show_progress=False)
    imp.accumulate(model, [batch])
    assert not batch.requires_grad and batch.grad is None
    assert torch.equal(batch, images32[:32])


def test_find_mlps_is_pure_and_marking_is_explicit():
    model = small_vit("glu", seed=2)
    fc1 = model.blocks[0].mlp.fc1
    amp.find_mlps(model)
    assert type(fc1) is torch.nn.Linear
    amp.prepare(model)
    assert type(fc1) is amp.PackedGateLinear
