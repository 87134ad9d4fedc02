"""timm's fused parallel blocks (`ParallelScalingBlock`: `vit_*_xp_*`, `vit_pwee_*`;
`DiffParallelScalingBlock`: `vit_dpwee_*`), whose MLP hidden layer shares `in_proj` with
q, k, v and (Diff) `out_proj` with the attention output: scored and masked at `mlp_drop`,
pruned by slicing, saved and loaded, refused by the NNI path. Real timm blocks, random
weights, digits images."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from contextlib import ExitStack

import pytest
import torch
import torch_pruning as tp
from amp_cli.app import app
from conftest import digit_images
from nni.compression.pruning import L1NormPruner
from typer.testing import CliRunner

import amp_plugin as amp
from amp_plugin.core.cost import count_flops, count_mlp_params, count_params
from amp_plugin.core.criterion import entropy_loss
from amp_plugin.core.mlp import FusedMLPView
from amp_plugin.nni import AMPNNIPruner, apply_nni_masks
from amp_plugin.nni.masks import MaskError
from amp_plugin.search.budget import SizeModel
from amp_plugin.search.pruner import masked_or_sliced

DIM, HEADS = 64, 2
# name -> (block class, MLP hidden size, whether the block has a separate mlp_out_proj)
MODELS = {
    "vit_base_patch16_xp_224": ("ParallelScalingBlock", 4 * DIM, True),
    "vit_pwee_patch16_reg1_gap_256": ("ParallelScalingBlock", 5 * DIM, True),
    "vit_dpwee_patch16_reg1_gap_256": ("DiffParallelScalingBlock", 5 * DIM, False),
}


def fused_vit(name: str) -> torch.nn.Module:
    """`name` at 32x32, 2 blocks, width 64, layer scale 1 (the pwee models start theirs at
    1e-5, which would hide the blocks), every bias random (timm starts them at 0)."""
    torch.manual_seed(0)
    model = amp.create_model({"library": "timm", "name": name, "kwargs": {
        "img_size": 32, "patch_size": 8, "embed_dim": DIM, "depth": 2, "num_heads": HEADS,
        "num_classes": 0, "init_values": 1.0}}).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
    return model


def features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    tower, adapter = amp.vision_tower(model)
    with torch.no_grad():
        return adapter.features(tower, x)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return digit_images(96)


@pytest.mark.parametrize("name", MODELS)
def test_blocks_are_fused_views_and_unpruned_slicing_changes_nothing(name, x):
    cls, hidden, separate = MODELS[name]
    model = fused_vit(name)
    views = amp.find_mlps(model)
    assert list(views) == ["blocks.0", "blocks.1"]
    for view in views.values():
        assert type(view.module).__name__ == cls and isinstance(view, FusedMLPView)
        assert view.kind == "timm_parallel_fused" and view.hidden == hidden
        assert view.tap is view.module.mlp_drop and view.inputs == [view.module.in_proj]
        assert view.output is (view.module.mlp_out_proj if separate else view.module.out_proj)
    want = features(model, x[:8])
    for view in views.values():  # every neuron kept: the same parameters, sliced
        view.prune(torch.arange(view.hidden))
    assert torch.equal(features(model, x[:8]), want)
    with ExitStack() as stack:
        for view in views.values():
            stack.enter_context(masked_or_sliced(model, view, torch.arange(view.hidden)))
        assert torch.equal(features(model, x[:8]), want)


@pytest.mark.parametrize("name", MODELS)
def test_masked_candidate_equals_the_sliced_block(name, x):
    _, hidden, separate = MODELS[name]
    model = fused_vit(name)
    g = torch.Generator().manual_seed(1)
    keep = {n: torch.randperm(hidden, generator=g)[:hidden // 3] for n in amp.find_mlps(model)}
    with ExitStack() as stack:
        for n, view in amp.find_mlps(model).items():
            stack.enter_context(masked_or_sliced(model, view, keep[n]))
        masked = features(model, x[:16])
    original = features(model, x[:16])
    sizes = amp.prune_mlps(model, x[:1], keep)
    assert sizes == {n: hidden // 3 for n in keep}
    pruned = features(model, x[:16])
    torch.testing.assert_close(pruned, masked, rtol=0, atol=1e-5)
    assert (pruned - original).abs().max() > 1e-3  # the neurons removed did act
    for block in model.blocks:
        h = hidden // 3
        assert block.in_split == [h, DIM, DIM, DIM]
        assert block.in_proj.weight.shape == (h + 3 * DIM, DIM)
        if block.mlp_bias is not None:
            assert block.mlp_bias.shape == (h,)
        out = block.mlp_out_proj if separate else block.out_proj
        assert out.weight.shape == (DIM, h if separate else DIM + h)


def test_removed_rows_are_the_mlp_neurons_and_qkv_stays(x):
    model = fused_vit("vit_dpwee_patch16_reg1_gap_256")
    block = model.blocks[0]
    w, b, out = (t.detach().clone() for t in (block.in_proj.weight, block.in_proj.bias,
                                               block.out_proj.weight))
    keep = torch.tensor([3, 7, 100, 319])
    amp.prune_mlps(model, x[:1], {"blocks.0": keep})
    assert torch.equal(block.in_proj.weight, torch.cat([w[keep], w[320:]]))
    assert torch.equal(block.in_proj.bias, torch.cat([b[keep], b[320:]]))
    assert torch.equal(block.out_proj.weight, torch.cat([out[:, :DIM], out[:, DIM + keep]], 1))


@pytest.mark.parametrize("name", ["vit_base_patch16_xp_224", "vit_dpwee_patch16_reg1_gap_256"])
def test_taylor_scores_equal_a_direct_computation(name, x):
    model = fused_vit(name)
    batch = x[:24]
    imp = amp.AMPImportance(20.0, show_progress=False)
    scores = imp.accumulate(model, [batch])

    acts = {}
    handles = [b.mlp_act.register_forward_hook(lambda _m, _a, out, i=i: acts.__setitem__(i, out))
               for i, b in enumerate(model.blocks)]
    try:
        images = batch.clone().requires_grad_(True)
        loss = entropy_loss(amp.vision_tower(model)[1].features(model, images), 20.0)
        grads = torch.autograd.grad(loss, [acts[0], acts[1]])
    finally:
        for h in handles:
            h.remove()
    for i, g in enumerate(grads):
        direct = (acts[i] * g).sum(dim=1).abs().mean(dim=0)  # mean_b |sum_t a * dE/da|
        assert direct.abs().max() > 0
        torch.testing.assert_close(scores[f"blocks.{i}"], direct.detach(), rtol=1e-4,
                                   atol=1e-9)


LOAD = """
import sys, torch, amp_plugin as amp
x = torch.load(sys.argv[1])
for path in sys.argv[2:]:
    model = amp.load_pruned(path)
    tower, adapter = amp.vision_tower(model)
    with torch.no_grad():
        torch.save(adapter.features(tower, x), path + ".features.pt")
"""


STEPPED = ("vit_base_patch16_xp_224", "vit_dpwee_patch16_reg1_gap_256")  # both outputs


def test_pruner_step_prunes_counts_and_reloads_in_a_fresh_process(x, tmp_path):
    want = {}
    for name in STEPPED:
        _, hidden, separate = MODELS[name]
        model = fused_vit(name)
        tower, _ = amp.vision_tower(model)
        params_before = sum(p.numel() for p in tower.parameters())
        imp = amp.AMPImportance(20.0, show_progress=False)
        imp.accumulate(model, [x[:32]])
        result = amp.AMPPruner(model, x[:1], imp, [x[32:64], x[64:]], threshold=5e-3,
                               max_steps=2, show_progress=False).step()
        sizes = result.hidden_sizes
        assert sizes == {n: v.hidden for n, v in amp.find_mlps(tower).items()}
        assert result.original_sizes == {"blocks.0": hidden, "blocks.1": hidden}
        assert all(s < hidden for s in sizes.values()), (name, sizes)
        assert [b.in_split[0] for b in model.blocks] == list(sizes.values())
        # a neuron: its in_proj row (DIM weights + a bias entry: in_proj.bias or mlp_bias)
        # and its output column (DIM weights)
        per_neuron = 2 * DIM + 1
        removed = sum(hidden - s for s in sizes.values())
        assert result.params == {"before": params_before,
                                 "after": params_before - per_neuron * removed}
        assert sum(p.numel() for p in tower.parameters()) == result.params["after"]
        own_bias = DIM if separate else 0  # mlp_out_proj's bias; out_proj's is shared
        assert result.mlp_params == {"before": 2 * (own_bias + per_neuron * hidden),
                                     "after": sum(own_bias + per_neuron * s
                                                  for s in sizes.values())}
        amp.save_pruned(model, tmp_path / name)
        want[name] = features(model, x[:8])
    torch.save(x[:8], tmp_path / "x.pt")
    subprocess.run([sys.executable, "-c", LOAD, str(tmp_path / "x.pt"),
                    *(str(tmp_path / n) for n in STEPPED)], check=True)
    for name in STEPPED:
        assert torch.equal(torch.load(tmp_path / f"{name}.features.pt"), want[name]), name


def test_nni_refuses_fused_blocks_naming_them(x):
    model = fused_vit("vit_dpwee_patch16_reg1_gap_256")
    with pytest.raises(MaskError, match=r"blocks\.0: DiffParallelScalingBlock fuses its MLP "
                                        r"into linears shared with attention \(rows of in_proj"):
        AMPNNIPruner(model, [{"op_names": ["blocks.0.in_proj"]}], val_batches=[x[:32]],
                     calib_batches=[x[32:64]], threshold=1e-3, show_progress=False)
    # masks of any NNI pruner on the shared linear: refused, the model left as it was
    dense = fused_vit("vit_base_patch16_xp_224")
    before = copy.deepcopy(dense.state_dict())
    pruner = L1NormPruner(dense, [{"op_names": ["blocks.0.in_proj"], "sparse_ratio": 0.5}])
    _, masks = pruner.compress()
    pruner.unwrap_model()
    with pytest.raises(MaskError, match=r"blocks\.0: ParallelScalingBlock fuses its MLP"):
        apply_nni_masks(dense, masks, x[:1])
    assert all(torch.equal(v, before[k]) for k, v in dense.state_dict().items())


def test_torch_pruning_script_refuses_fused_blocks_naming_them(x):
    model = fused_vit("vit_base_patch16_xp_224")
    before = copy.deepcopy(model.state_dict())
    imp = amp.AMPImportance(20.0, show_progress=False)
    amp.prepare(model)
    pruner = tp.pruner.MetaPruner(model, x[:1], importance=imp, pruning_ratio=0.5,
                                  customized_pruners=amp.customized_pruners())
    imp.accumulate(model, [x[:32]])
    with pytest.raises(RuntimeError, match=r"blocks\.\d: ParallelScalingBlock fuses its MLP "
                                           r".*amp\.AMPPruner"):
        for group in pruner.step(interactive=True):
            group.prune()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_bench_models_match_sweeps_only_the_named_models(tmp_path):
    out = tmp_path / "rows.json"
    done = CliRunner().invoke(app, ["bench", "models", "--match", "dpwee", "--json", str(out)])
    assert done.exit_code == 0, done.output
    rows = json.loads(out.read_text())["rows"]
    assert [(r["name"], r["family"], r["mlp_kinds"], r["status"]) for r in rows] == [
        ("vit_dpwee_patch16_reg1_gap_256", "timm_vit", "timm_parallel_fused", "ok")]
    assert rows[0]["detail"].startswith("2 MLPs, ")


@pytest.mark.parametrize("name", MODELS)
def test_budget_size_model_predicts_the_pruned_counts(name, x):
    """Budget mode's per-neuron parameters and FLOPs (tokens read at the tap) give exactly
    the counts of the sliced model."""
    model = fused_vit(name)
    tower, _ = amp.vision_tower(model)
    size_model = SizeModel(tower, amp.find_mlps(tower), x[:1])
    sizes = {"blocks.0": 50, "blocks.1": 17}
    amp.prune_mlps(tower, x[:1], {n: torch.arange(s) for n, s in sizes.items()})
    assert size_model.at("params", sizes) == count_params(tower)
    assert size_model.at("mlp_params", sizes) == count_mlp_params(tower)
    assert size_model.at("flops", sizes) == count_flops(tower, x[:1])
