"""Every ViT-like model of timm and open_clip: pruned end to end, or refused clearly.

The fast subset of the registry sweep (`amp bench models` runs all of it), the pooling-head
MLP policy, subsets of MLPs natively and through NNI, refusals before any work, and
Torch-Pruning scripts as users write them."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch_pruning as tp
from conftest import digit_images, small_vit
from nni.compression.pruning import L1NormPruner

import amp_plugin as amp
from amp_plugin.bench.models import FAST, small_spec, sweep_one
from amp_plugin.core.adapter import UnsupportedModel
from amp_plugin.families.open_clip import OpenClipCLIP
from amp_plugin.nni import AMPNNIPruner, apply_nni_masks
from amp_plugin.nni.masks import MaskError

REFUSED = {"xcit_tiny_12_p16_224": "Xcit",
           "RN50": "ModifiedResNet", "convnext_base": "ConvNeXt",
           "volo_d1_224": "VOLO: VOLO's first stage"}


@pytest.mark.parametrize("library,name", FAST, ids=[n for _, n in FAST])
def test_sweep_fast_subset(library, name, tmp_path):
    row = sweep_one(library, name, tmp_path)
    if name in REFUSED:
        assert row.status == "refused", row
        assert REFUSED[name] in row.detail
    else:
        assert row.status == "ok", row
        assert row.mlp_kinds and row.family in {a.family for a in amp.list_adapters()}


def _small(name: str, **extra) -> torch.nn.Module:
    spec = small_spec("timm", name)
    spec["kwargs"].update(extra)
    torch.manual_seed(0)
    return amp.create_model(spec).eval()


def _searched(model, x, **kw):
    imp = amp.AMPImportance(20.0, show_progress=False)
    imp.accumulate(model, [x[:32]])
    return amp.AMPPruner(model, x[:1], imp, [x[32:64], x[64:]], threshold=2e-3, max_steps=3,
                         show_progress=False, **kw).step()


# ---- attention-pool (MAP) heads ------------------------------------------------------------
def test_map_head_mlp_kept_whole_by_default_and_searched_on_request():
    x = digit_images(96)
    model = _small("vit_base_patch16_siglip_224")
    assert "attn_pool.mlp" in amp.find_mlps(model)
    result = _searched(model, x)
    assert result.kept_whole == {"attn_pool.mlp": amp.search.greedy.HEAD_KEPT}
    assert result.hidden_sizes["attn_pool.mlp"] == result.original_sizes["attn_pool.mlp"]
    assert "attn_pool.mlp" not in {t.block for t in result.trace}

    # search_head=True: searched first (it runs after the last block), from the cached
    # state after the last block; sizes equal those of full forward passes per trial
    fast, slow = _small("vit_base_patch16_siglip_224"), _small("vit_base_patch16_siglip_224")
    r_fast = _searched(fast, x, search_head=True)
    r_slow = _searched(slow, x, search_head=True,
                       feature_fn=lambda m, im: m.forward_head(m.forward_features(im),
                                                               pre_logits=True))
    assert r_fast.trace[0].block == "attn_pool.mlp" and r_fast.kept_whole == {}
    assert r_fast.cache.startswith("full, device") and r_slow.cache.startswith("none")
    assert r_fast.hidden_sizes == r_slow.hidden_sizes
    assert [t.entropy for t in r_fast.trace] == pytest.approx([t.entropy for t in r_slow.trace],
                                                               abs=1e-5)


def test_map_head_in_torch_pruning_and_nni():
    x = digit_images(96)
    model = _small("vit_so150m_patch16_reg4_map_256")
    before = {n: v.hidden for n, v in amp.find_mlps(model).items()}
    imp = amp.AMPImportance(20.0, show_progress=False)
    imp.accumulate(model, [x[:32]])
    pruner = tp.pruner.BasePruner(model, x[:1], importance=imp, pruning_ratio=0.5,
                                  customized_pruners=amp.customized_pruners(),
                                  ignored_layers=[model.head])
    pruner.step()
    sizes = {n: v.hidden for n, v in amp.find_mlps(model).items()}
    assert sizes == {"blocks.0.mlp": before["blocks.0.mlp"] // 2,
                     "blocks.1.mlp": before["blocks.1.mlp"] // 2,
                     "attn_pool.mlp": before["attn_pool.mlp"]}  # the head is kept whole

    model = _small("vit_so150m_patch16_reg4_map_256")
    nni = AMPNNIPruner(model, [{"op_types": ["Mlp"]}], calib_batches=[x[:32]],
                       val_batches=[x[32:64], x[64:]], threshold=2e-3, max_steps=3,
                       show_progress=False)
    nni.compress()
    assert list(nni.search.hidden_sizes) == ["blocks.0.mlp", "blocks.1.mlp"]
    assert nni.search.kept_whole == {"attn_pool.mlp": amp.search.greedy.HEAD_KEPT}


# ---- subsets of MLPs: native and NNI agree -------------------------------------------------
@pytest.mark.parametrize("model_fn,subset", [
    (lambda: small_vit(depth=4), ["blocks.1.mlp", "blocks.2.mlp"]),
    (lambda: small_vit(depth=4), ["blocks.0.mlp", "blocks.3.mlp"]),
    (lambda: _small("vit_small_patch16_18x2_224"), ["blocks.0.ffns.1.mlp", "blocks.1.ffns.0.mlp"]),
], ids=["middle", "ends", "parallel_mlps"])
def test_nni_subset_equals_native_restricted_run(model_fn, subset):
    x = digit_images(96)
    calib, val = [x[:32]], [x[32:64], x[64:]]
    native = model_fn()
    imp = amp.AMPImportance(20.0, show_progress=False)
    imp.accumulate(native, calib)
    kw = dict(threshold=1e-3, max_steps=4, show_progress=False)
    ref = amp.AMPPruner(native, x[:1], imp, val, mlps=subset, **kw).step()
    assert set(ref.kept_whole) == set(ref.original_sizes) - set(subset)

    model = model_fn()
    pruner = AMPNNIPruner(model, [{"op_names": subset}], val_batches=val, importance=imp, **kw)
    _, masks = pruner.compress()
    pruner.unwrap_model()
    assert pruner.search.hidden_sizes == {n: ref.hidden_sizes[n] for n in subset}
    sizes = apply_nni_masks(model, masks, x[:1])
    assert sizes == ref.hidden_sizes
    with torch.no_grad():
        torch.testing.assert_close(model(x[:8]), native(x[:8]), rtol=0, atol=1e-5)


def test_nni_subset_with_the_lowest_mlp_kept_whole():
    # max_steps=1 tries only half the width; at threshold 0 any rise keeps the MLP whole
    # (with these weights both selected MLPs are kept whole, the lowest last)
    x = digit_images(96)
    calib, val = [x[:32]], [x[32:64], x[64:]]
    kw = dict(threshold=0.0, max_steps=1, show_progress=False)
    pruner = AMPNNIPruner(small_vit(depth=4), [{"op_names_re": [r"blocks\.[23]\.mlp$"]}],
                          calib_batches=calib, val_batches=val, **kw)
    pruner.compress()
    low = pruner.search.trace[-1]
    assert low.block == "blocks.2.mlp" and not low.accepted
    native = small_vit(depth=4)
    imp = amp.AMPImportance(20.0, show_progress=False)
    imp.accumulate(native, calib)
    ref = amp.AMPPruner(native, x[:1], imp, val, mlps=["blocks.2.mlp", "blocks.3.mlp"],
                        **kw).step()
    assert pruner.search.hidden_sizes == {"blocks.2.mlp": 256, "blocks.3.mlp": 256}
    assert {n: ref.hidden_sizes[n] for n in pruner.search.hidden_sizes} == \
        pruner.search.hidden_sizes
    assert pruner.search.entropy == pytest.approx(ref.entropy, abs=1e-6)


def test_apply_nni_masks_on_a_whole_open_clip_model():
    x = digit_images(8)
    torch.manual_seed(0)
    model = amp.create_model(OpenClipCLIP.example).eval()
    fc = [{"op_types": ["Linear"], "op_names_re": [r"visual\..*\.mlp\.c_fc"],
           "sparse_ratio": 0.5}]
    pruner = L1NormPruner(model, fc)
    _, masks = pruner.compress()
    with torch.no_grad():
        masked = model.encode_image(x)
    pruner.unwrap_model()
    sizes = apply_nni_masks(model, masks, x[:1])
    assert sizes == {"visual.transformer.resblocks.0.mlp": 128,
                     "visual.transformer.resblocks.1.mlp": 128,
                     "transformer.resblocks.0.mlp": 256}  # the text tower is left alone
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), masked, rtol=0, atol=1e-5)


def test_swiglu_hidden_norm_refusal_names_the_norm():
    model = small_vit("swiglu", scale_mlp_norm=True)
    with pytest.raises(MaskError, match=r"blocks\.0\.mlp\.norm, LayerNorm"):
        AMPNNIPruner(model, [{"op_types": ["SwiGLU"]}], calib_batches=[digit_images(8)],
                     val_batches=[digit_images(8)], threshold=1e-3, show_progress=False)


# ---- refusals ------------------------------------------------------------------------------
@pytest.mark.parametrize("name,cls", [("resnet18", "ResNet"), ("convnext_atto", "ConvNeXt"),
                                      ("swin_tiny_patch4_window7_224", "SwinTransformer"),
                                      ("mixer_s16_224", "MlpMixer")])
def test_non_transformers_refused_before_any_work(name, cls):
    with torch.device("meta"):  # nothing runs: the refusal comes first
        model = timm.create_model(name, pretrained=False)
    types = [type(m) for m in model.modules()]
    x = torch.zeros(2, 3, 32, 32, device="meta")
    for attempt in (lambda: amp.AMPImportance(show_progress=False).accumulate(model, [x]),
                    lambda: amp.AMPPruner(model, x, amp.AMPImportance(), [x], 1e-3),
                    lambda: AMPNNIPruner(model, [{"op_types": ["Mlp"]}], val_batches=[x],
                                         calib_batches=[x], threshold=1e-3)):
        with pytest.raises(UnsupportedModel, match=rf"{cls}.*timm_vit.*open_clip"):
            attempt()
    assert [type(m) for m in model.modules()] == types  # nothing marked or wrapped


@pytest.mark.parametrize("name,reason", [
    ("levit_128", "LevitDistilled: LeViT's stages shrink the token grid"),  # a subclass
    ("pit_ti_224", "PoolingVisionTransformer: PiT pools the token grid"),
    ("tnt_s_patch16_224", "TNT: TNT nests an inner transformer"),
    ("crossvit_9_240", "CrossVit: CrossViT runs two token branches"),
])
def test_transformers_without_an_adapter_are_refused_with_their_layout(name, reason, tmp_path):
    row = sweep_one("timm", name, tmp_path)
    assert row.status == "refused" and reason in row.detail, row


@pytest.mark.parametrize("name", ["samvit_base_patch16", "qwen3_vit_88m_merge",
                                  "deepseek_vit_412m_enc", "gemma4_vit_167m_enc", "convit_tiny"])
def test_encoder_heads_blockwise_equal_the_models_forward(name):
    """Adapters that rebuild an encoder's tail (SAM's neck, a VLM projector, Gemma 4's
    soft-token pooler) or its block loop (ConViT's class token joining midway) give the
    model's own features when run block by block."""
    torch.manual_seed(0)
    model = amp.create_model(small_spec("timm", name)).eval()
    tower, adapter = amp.vision_tower(model)
    x = digit_images(4)
    with torch.no_grad():
        state = adapter.embed(tower, x)
        for i in range(len(adapter.blocks(tower))):
            state = adapter.run_block(tower, i, state)
        torch.testing.assert_close(adapter.head(tower, state), adapter.features(tower, x),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["eva02_tiny_patch14_224", "beitv2_base_patch16_224",
                                  "cait_xxs24_224", "naflexvit_base_patch16_gap",
                                  "qwen3_vit_88m_merge", "gemma4_vit_167m_enc"])
def test_final_tokens_under_activation_checkpointing(name):
    """The distiller's tokens (`final_tokens`) are the same with the tower's activation
    checkpointing on, and each block really is recomputed in the backward pass."""
    torch.manual_seed(0)
    model = amp.create_model(small_spec("timm", name))
    tower, adapter = amp.vision_tower(model)
    x = digit_images(4)
    plain = adapter.final_tokens(tower, x)
    adapter.set_grad_checkpointing(tower, True)
    ran = []
    handles = [b.register_forward_pre_hook(lambda *_: ran.append(1))
               for b in adapter.blocks(tower)]
    ckpt = adapter.final_tokens(tower, x)
    sum(t.sum() for t in ckpt).backward()
    for h in handles:
        h.remove()
    assert len(ran) == 2 * len(adapter.blocks(tower))
    for a, b in zip(plain, ckpt, strict=True):
        torch.testing.assert_close(a, b)


def test_hugging_face_text_configs_build_their_vision_tower_alone():
    """nllb / roberta / mt5 CLIPs: the image tower needs no hub; the whole model is refused
    before any download is tried, naming the way out."""
    spec = small_spec("open_clip", "nllb-clip-base-siglip")
    tower = amp.create_model(spec)
    assert type(tower).__name__ == "TimmModel" and "attn_pool" in str(amp.find_mlps(tower))
    whole = {"library": "open_clip", "name": "nllb-clip-base-siglip"}
    with pytest.raises(ValueError, match="Hugging Face model.*image_only"):
        amp.create_model(whole)


def test_relpos_position_mlp_is_not_a_block_mlp():
    model = _small("vit_relpos_small_patch16_224")
    assert any(type(m).__name__ == "RelPosMlp" for m in model.modules())
    assert list(amp.find_mlps(model)) == ["blocks.0.mlp", "blocks.1.mlp"]


# ---- Torch-Pruning's ViT example with AMPImportance ----------------------------------------
@pytest.mark.parametrize("name", ["vit_base_patch16_siglip_224", "eva02_tiny_patch14_224"])
def test_torch_pruning_vit_example_with_amp_importance(name):
    # the flow of Torch-Pruning's examples/transformers/prune_timm_vit.py: build the model,
    # build a MetaPruner (num_heads, head ignored), accumulate the importance, step
    x = digit_images(64)
    model = _small(name)
    reference = copy.deepcopy(model)
    num_heads = {m.qkv: m.num_heads for m in model.modules()
                 if isinstance(m, timm.models.vision_transformer.Attention)}
    imp = amp.AMPImportance(20.0, show_progress=False)
    amp.prepare(model)  # the added line: packed gates (EVA02) get their own pruner
    pruner = tp.pruner.MetaPruner(model, x[:1], importance=imp, pruning_ratio=0.5,
                                  ignored_layers=[model.head], num_heads=num_heads,
                                  customized_pruners=amp.customized_pruners())
    imp.accumulate(model, [x[:32], x[32:]])  # replaces the labelled Taylor loop
    for group in pruner.step(interactive=True):
        group.prune()
    before = {n: v.hidden for n, v in amp.find_mlps(reference).items()}
    after = {n: v.hidden for n, v in amp.find_mlps(model).items()}
    for n in before:
        head = n.startswith("attn_pool")
        assert after[n] == (before[n] if head else before[n] // 2), n
    attn = [(n, p.shape) for n, p in model.named_parameters() if ".attn." in n]
    assert attn == [(n, p.shape) for n, p in reference.named_parameters() if ".attn." in n]
    with torch.no_grad():
        assert model(x[:2]).shape == reference(x[:2]).shape
