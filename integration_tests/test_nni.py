"""NNI 3.0 compatibility: AMP as an NNI pruner, NNI masks to a smaller model, and NNI's
TaylorPruner on the entropy, with real NNI, timm, open_clip and Torch-Pruning objects."""

from __future__ import annotations

import copy

import open_clip
import pytest
import timm
import torch
from nni.compression.pruning import L1NormPruner, LevelPruner, TaylorPruner
from torch import nn

from amp_plugin import AMPImportance, AMPPruner
from amp_plugin.core.criterion import entropy_loss
from amp_plugin.data import digits_raw, to_model_input
from amp_plugin.nni import (
    AMPNNIPruner,
    MaskError,
    apply_nni_masks,
    entropy_evaluator,
    select_mlps,
)

INV_T = 20.0
HIDDEN = 256  # embed_dim 64 * mlp_ratio 4


def tiny_vit(depth: int = 3, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8,
                             embed_dim=64, depth=depth, num_heads=2, num_classes=0,
                             **kwargs).eval()


def tiny_open_clip() -> nn.Module:
    torch.manual_seed(0)
    return open_clip.transformer.VisionTransformer(
        image_size=32, patch_size=8, width=64, layers=2, heads=2, mlp_ratio=4.0,
        output_dim=32).eval()


@pytest.fixture(scope="module")
def data():
    x, _ = digits_raw()
    images = to_model_input(x[:320], 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    return dict(
        calib=[images[i:i + 64] for i in range(0, 128, 64)],
        val=[images[i:i + 64] for i in range(128, 320, 64)],
        example=images[:2],
        probe=images[:24],
    )


def quiet_importance(scores=None, model=None) -> AMPImportance:
    imp = AMPImportance(INV_T, show_progress=False)
    return imp.load_scores(scores, model) if scores is not None else imp


def outputs(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images)


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- AMP through NNI == native AMP -----------------------------------------------------------
@pytest.mark.parametrize("family", ["timm", "open_clip"])
def test_amp_nni_pruner_matches_native(data, family):
    model = tiny_vit() if family == "timm" else tiny_open_clip()
    threshold = 3e-3
    scores = quiet_importance().accumulate(copy.deepcopy(model), data["calib"])

    native = copy.deepcopy(model)
    result = AMPPruner(native, data["example"], quiet_importance(scores, native), data["val"],
                       threshold, show_progress=False).step()

    dense = copy.deepcopy(model)
    pruner = AMPNNIPruner(dense, [{"op_names_re": [r".*\.mlp$"]}], val_batches=data["val"],
                          threshold=threshold, importance=quiet_importance(scores),
                          show_progress=False)
    returned, masks = pruner.compress()
    assert returned is dense
    masked_out = outputs(dense, data["probe"])  # NNI's wrapped, masked model
    pruner.unwrap_model()
    sizes = apply_nni_masks(dense, masks, data["example"])

    assert sizes == result.hidden_sizes == pruner.search.hidden_sizes
    assert [(t.block, t.size, t.accepted) for t in pruner.search.trace] == \
        [(t.block, t.size, t.accepted) for t in result.trace]
    for mine, ref in zip(pruner.search.trace, result.trace, strict=True):
        assert mine.entropy == pytest.approx(ref.entropy, abs=1e-5)
    native_out = outputs(native, data["probe"])
    torch.testing.assert_close(outputs(dense, data["probe"]), native_out, rtol=0, atol=1e-6)
    torch.testing.assert_close(masked_out, native_out, rtol=0, atol=1e-5)

    # NNI's mask format: the MLP input linears, whole rows, bias aligned, kept = top scores
    views = {n.rpartition(".")[0]: n for n in masks}
    assert set(views) == set(result.hidden_sizes)
    for mlp, lin in views.items():
        w, b = masks[lin]["weight"], masks[lin]["bias"]
        assert w.shape == (HIDDEN, 64) and b.shape == (HIDDEN,)
        rows = w[:, 0]
        assert torch.equal(w, rows[:, None].expand_as(w)) and torch.equal(b, rows)
        score = scores[mlp]
        expect = torch.zeros(HIDDEN)
        expect[torch.sort(score, descending=True, stable=True).indices[:sizes[mlp]]] = 1
        assert torch.equal(rows.float(), expect)

    if family == "timm":  # the search must have both accepted and rejected candidates
        assert any(t.accepted for t in result.trace) and not all(t.accepted for t in result.trace)


def test_clip_entropy_through_nni_equals_native(data):
    """The image-text criterion through NNI: features projected into the joint space, the
    same loop as AMPPruner, so the same sizes, trials and entropies."""
    from amp_plugin import clip_entropy_loss

    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg={"image_size": 32, "patch_size": 8, "width": 64, "layers": 3,
                    "head_width": 32, "mlp_ratio": 4},
        text_cfg={"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2,
                  "layers": 1}).eval()
    x, y = digits_raw()
    images = to_model_input(x[:320], 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    digits = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=16)
    with torch.no_grad():
        text = model.encode_text(tokenizer([f"a photo of the digit {digits[i]}"
                                            for i in y[:320].tolist()]))
    calib = [(images[i:i + 64], text[i:i + 64]) for i in range(0, 128, 64)]
    val = [(images[i:i + 64], text[i:i + 64]) for i in range(128, 320, 64)]

    def importance():
        return AMPImportance(INV_T, criterion="clip_entropy", show_progress=False)

    scores = importance().accumulate(copy.deepcopy(model), calib)
    native = copy.deepcopy(model)
    threshold = 2e-3
    result = AMPPruner(native, images[:2], importance().load_scores(scores, native), val,
                       threshold, show_progress=False).step()
    dense = copy.deepcopy(model)
    pruner = AMPNNIPruner(dense, [{"op_names_re": [r".*\.mlp$"]}], val_batches=val,
                          threshold=threshold, importance=importance().load_scores(scores),
                          show_progress=False)
    pruner.compress()
    search = pruner.search
    assert {n.removeprefix("visual."): h for n, h in search.hidden_sizes.items()} == \
        result.hidden_sizes
    assert [(t.block.removeprefix("visual."), t.index, t.size, t.accepted)
            for t in search.trace] == [(t.block, t.index, t.size, t.accepted)
                                       for t in result.trace]
    for mine, ref in zip(search.trace, result.trace, strict=True):
        assert mine.entropy == pytest.approx(ref.entropy, abs=1e-5)
    # both measured the image-text entropy of the projected image embeddings
    with torch.no_grad():
        want = sum(float(clip_entropy_loss(model.encode_image(im), t, INV_T))
                   for im, t in val) / len(val)
    assert result.entropy["before"] == pytest.approx(want, rel=1e-5)
    assert search.entropy["before"] == pytest.approx(want, rel=1e-5)
    assert search.mlp_params == result.mlp_params  # one result type, the same counts


def test_config_list_selects_mlps(data):
    model = tiny_vit()
    assert select_mlps(model, [{"op_types": ["Mlp"]}]) == [f"blocks.{i}.mlp" for i in range(3)]
    # a layer inside an MLP selects that MLP; NNI's exclude keys and the older exclude form
    assert select_mlps(model, [{"op_names": ["blocks.2.mlp.fc2", "blocks.0.mlp"]}]) == \
        ["blocks.0.mlp", "blocks.2.mlp"]
    assert select_mlps(model, [{"op_types": ["Linear"],
                                "exclude_op_names_re": [r"blocks\.1\..*"]}]) == \
        ["blocks.0.mlp", "blocks.2.mlp"]
    assert select_mlps(model, [{"op_types": ["Mlp"]},
                               {"exclude": True, "op_names": ["blocks.1.mlp"]}]) == \
        ["blocks.0.mlp", "blocks.2.mlp"]

    bad = [
        ([{"op_types": ["Mlp"], "sparse_ratio": 0.5}], "config_list[0].sparse_ratio"),
        ([{"op_names": ["blocks.7.mlp"]}], "no module named 'blocks.7.mlp'"),
        ([{"op_names": ["blocks.0.attn.qkv"]}], "'blocks.0.attn.qkv' is not an MLP"),
        ([{"op_types": ["Conv2d"]}], "config_list[0] selects no MLP"),
        ([{"exclude_op_types": ["Mlp"]}], "config_list[0] needs one of"),
        ([{"op_names": "blocks.0.mlp"}], "config_list[0].op_names must be a list of strings"),
    ]
    for config, message in bad:
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            AMPNNIPruner(model, config, val_batches=data["val"], threshold=1e-3,
                         calib_batches=data["calib"])
        assert not any(hasattr(m, "_nni_wrapper") for m in model.modules())

    # only the last MLP selected: it is searched first, as in the native run
    scores = quiet_importance().accumulate(copy.deepcopy(model), data["calib"])
    native = copy.deepcopy(model)
    ref = AMPPruner(native, data["example"], quiet_importance(scores, native), data["val"],
                    3e-3, show_progress=False).step()
    pruner = AMPNNIPruner(model, [{"op_names": ["blocks.2.mlp.fc1"]}], val_batches=data["val"],
                          threshold=3e-3, importance=quiet_importance(scores),
                          show_progress=False)
    _, masks = pruner.compress()
    assert list(masks) == ["blocks.2.mlp.fc1"]
    pruner.unwrap_model()
    sizes = apply_nni_masks(model, masks, data["example"])
    assert sizes == {"blocks.0.mlp": HIDDEN, "blocks.1.mlp": HIDDEN,
                     "blocks.2.mlp": ref.hidden_sizes["blocks.2.mlp"]}


@pytest.mark.parametrize("layer", ["GluMlp", "SwiGLU"])
def test_amp_nni_pruner_scores_calibration_and_gated_mlp(data, layer):
    """Scores computed by the pruner itself; a gated MLP masks gate and value rows together
    (the two halves of GluMlp's packed fc1, or SwiGLU's fc1_g and fc1_x)."""
    model = tiny_vit(depth=2, mlp_layer=getattr(timm.layers, layer), act_layer=nn.SiLU)
    native = copy.deepcopy(model)
    imp = quiet_importance()
    imp.accumulate(native, data["calib"])
    result = AMPPruner(native, data["example"], imp, data["val"], 1e-3, show_progress=False).step()

    pruner = AMPNNIPruner(model, [{"op_types": [layer]}], val_batches=data["val"],
                          threshold=1e-3, calib_batches=data["calib"], inv_temperature=INV_T,
                          show_progress=False)
    _, masks = pruner.compress()
    for name, size in pruner.search.hidden_sizes.items():
        if layer == "GluMlp":
            rows = masks[f"{name}.fc1"]["weight"][:, 0]
            gate, value = rows[:HIDDEN // 2], rows[HIDDEN // 2:]
        else:
            gate = masks[f"{name}.fc1_g"]["weight"][:, 0]
            value = masks[f"{name}.fc1_x"]["weight"][:, 0]
        assert torch.equal(gate, value) and int(gate.sum()) == size
    pruner.unwrap_model()
    assert apply_nni_masks(model, masks, data["example"]) == result.hidden_sizes
    torch.testing.assert_close(outputs(model, data["probe"]), outputs(native, data["probe"]),
                               rtol=0, atol=1e-6)


# ---- masks of NNI's own pruners to a smaller model -------------------------------------------
@pytest.mark.parametrize("family", ["timm", "open_clip"])
def test_l1norm_masks_shrink_every_mlp_to_half(data, family):
    model = tiny_vit() if family == "timm" else tiny_open_clip()
    original = copy.deepcopy(model)
    fc1 = r".*\.mlp\.fc1" if family == "timm" else r".*\.mlp\.c_fc"
    pruner = L1NormPruner(model, [{"op_types": ["Linear"], "op_names_re": [fc1],
                                   "sparse_ratio": 0.5}])
    _, masks = pruner.compress()
    masked_out = outputs(model, data["probe"])
    pruner.unwrap_model()
    params_before = sum(p.numel() for p in model.parameters())

    sizes = apply_nni_masks(model, masks, data["example"])
    assert sizes and all(size == HIDDEN // 2 for size in sizes.values())
    torch.testing.assert_close(outputs(model, data["probe"]), masked_out, rtol=0, atol=1e-5)
    # each MLP loses half of its fc1 rows and fc2 columns: 2 * 128 * 64 + 128 (fc1 bias)
    removed = params_before - sum(p.numel() for p in model.parameters())
    assert removed == len(sizes) * (2 * 128 * 64 + 128)
    # the kept rows are the L1-largest of the original fc1, in their order
    for name in sizes:
        before = original.get_submodule(name)
        after = model.get_submodule(name)
        w0 = (before.fc1 if family == "timm" else before.c_fc).weight
        w1 = (after.fc1 if family == "timm" else after.c_fc).weight
        keep = torch.sort(torch.topk(w0.abs().sum(1), HIDDEN // 2).indices).values
        assert torch.equal(w1, w0[keep])


def test_fc2_column_masks_are_hidden_neurons(data):
    """Whole-column masks on the output linear also stand for removed neurons."""
    model = tiny_vit(depth=2)
    pruner = L1NormPruner(model, [{"op_names": ["blocks.0.mlp.fc2"], "sparse_ratio": 0.25,
                                   "granularity": "in_channel"}])
    _, masks = pruner.compress()
    masked_out = outputs(model, data["probe"])
    pruner.unwrap_model()
    sizes = apply_nni_masks(model, masks, data["example"])
    assert sizes == {"blocks.0.mlp": 192, "blocks.1.mlp": HIDDEN}
    torch.testing.assert_close(outputs(model, data["probe"]), masked_out, rtol=0, atol=1e-5)


def test_malformed_masks_are_refused_and_model_unchanged(data):
    model = tiny_vit(depth=2)
    fine = copy.deepcopy(model)  # element-wise masks from NNI's LevelPruner
    level = LevelPruner(fine, [{"op_names": ["blocks.1.mlp.fc1"], "sparse_ratio": 0.5}])
    _, level_masks = level.compress()
    level.unwrap_model()
    rows = copy.deepcopy(model)  # default out_channel masks on fc2: embedding channels
    l1 = L1NormPruner(rows, [{"op_names": ["blocks.0.mlp.fc2"], "sparse_ratio": 0.5}])
    _, fc2_masks = l1.compress()
    l1.unwrap_model()

    with torch.no_grad():  # timm initialises biases to 0; a masked row must then drop b too
        model.blocks[0].mlp.fc1.bias.normal_(0.0, 0.1)
    w = model.blocks[0].mlp.fc1.weight
    bias_only = torch.ones(HIDDEN)
    bias_only[3] = 0
    cases = [
        (level_masks, "blocks.1.mlp.fc1.weight: row 0 is partly masked"),
        (fc2_masks, "blocks.0.mlp.fc2.weight: masks whole output rows"),
        ({"blocks.0.attn.qkv": {"weight": torch.zeros_like(model.blocks[0].attn.qkv.weight)}},
         "blocks.0.attn.qkv.weight: Linear 'blocks.0.attn.qkv' is not a linear of an MLP"),
        ({"blocks.0.mlp.fc1": {"weight": torch.ones(HIDDEN, 3)}},
         r"blocks.0.mlp.fc1.weight: mask shape \(256, 3\) does not fit"),
        ({"blocks.0.mlp.fc1": {"weight": torch.full_like(w, 0.5)}}, "must be 0 or 1"),
        ({"blocks.0.mlp.fc1": {"bias": bias_only}},
         "blocks.0.mlp.fc1.bias: entry 3 is masked but weight row 3 is kept"),
        ({"blocks.0.mlp.fc1": {"weight": torch.zeros_like(w), "bias": torch.zeros(HIDDEN)}},
         "blocks.0.mlp: masks switch off all 256 hidden neurons"),
        ({"blocks.9.mlp.fc1": {"weight": torch.zeros_like(w)}}, "'blocks.9.mlp.fc1'"),
    ]
    before = copy.deepcopy(model)
    for masks, message in cases:
        with pytest.raises(MaskError, match=message):
            apply_nni_masks(model, masks, data["example"])
        assert same_state(model, before)
        assert model.blocks[0].mlp.fc1.out_features == HIDDEN

    # a row masked without its bias leaves a live neuron (GELU(b) != 0): refused
    no_bias_mask = torch.ones_like(w)
    no_bias_mask[5] = 0
    with pytest.raises(MaskError, match="blocks.0.mlp: masks switch off rows of hidden neuron 5"):
        apply_nni_masks(model, {"blocks.0.mlp.fc1": {"weight": no_bias_mask}}, data["example"])
    # a gate half masked under sigmoid (activation(0) = 0.5) is not a removed neuron
    glu = tiny_vit(depth=2, mlp_layer=timm.layers.GluMlp, act_layer=nn.Sigmoid)
    gate = torch.ones_like(glu.blocks[0].mlp.fc1.weight)
    gate[HIDDEN // 2 + 7] = 0  # gate_last: the second half is the gate
    with pytest.raises(MaskError, match="hidden neuron 7"):
        apply_nni_masks(glu, {"blocks.0.mlp.fc1": {"weight": gate,
                                                    "bias": gate[:, 0].clone()}},
                        data["example"])
    # still wrapped by NNI
    wrapped = copy.deepcopy(model)
    L1NormPruner(wrapped, [{"op_names": ["blocks.0.mlp.fc1"], "sparse_ratio": 0.5}])
    with pytest.raises(MaskError, match="call pruner.unwrap_model"):
        apply_nni_masks(wrapped, {}, data["example"])
    assert same_state(model, before)


# ---- NNI's TaylorPruner on the entropy -------------------------------------------------------
def test_taylor_pruner_with_entropy_evaluator(data):
    model = tiny_vit(depth=2)
    reference = copy.deepcopy(model)
    evaluator = entropy_evaluator(model, data["calib"], INV_T, show_progress=False)
    pruner = TaylorPruner(model, [{"op_names_re": [r"blocks\.\d+\.mlp\.fc1"],
                                   "sparse_ratio": 0.5}], evaluator,
                          training_steps=len(data["calib"]))
    _, masks = pruner.compress()
    masked_out = outputs(model, data["probe"])
    pruner.unwrap_model()
    assert same_state(model, reference)  # lr 0: the steps only collected gradients

    # NNI's Taylor metric, computed directly: sum over batches of (w * dE/dw)^2 per fc1 row
    fc1 = [blk.mlp.fc1.weight for blk in reference.blocks]
    acc = [torch.zeros_like(w) for w in fc1]
    for images in data["calib"]:
        reference.zero_grad()
        feats = reference.forward_head(reference.forward_features(images), pre_logits=True)
        entropy_loss(feats, INV_T).backward()
        for a, w in zip(acc, fc1, strict=True):
            a += (w.detach() * w.grad) ** 2
    for i, a in enumerate(acc):
        expect = torch.zeros(HIDDEN)
        expect[torch.topk(a.sum(1), HIDDEN // 2).indices] = 1
        m = masks[f"blocks.{i}.mlp.fc1"]
        assert torch.equal(m["weight"][:, 0].float(), expect)
        assert torch.equal(m["bias"].float(), expect)

    sizes = apply_nni_masks(model, masks, data["example"])
    assert sizes == {"blocks.0.mlp": HIDDEN // 2, "blocks.1.mlp": HIDDEN // 2}
    torch.testing.assert_close(outputs(model, data["probe"]), masked_out, rtol=0, atol=1e-5)
