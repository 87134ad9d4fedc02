"""The Python API misused as a newcomer would: each mistake stops with an error naming the
argument and what was expected, before any work (the model left as it was), or is a
documented behaviour that gives the same answer as the right use."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch_pruning as tp
from conftest import digit_images, small_vit
from torch.utils.data import DataLoader

import amp_plugin as amp
from amp_plugin.data.loader import TensorItems, amp_loader, calibration_images
from amp_plugin.utils.finite import NonFiniteError


def _sizes(model) -> dict[str, int]:
    return {n: v.hidden for n, v in amp.find_mlps(model).items()}


def _imp() -> amp.AMPImportance:
    return amp.AMPImportance(inv_temperature=20.0, show_progress=False)


def _prune(model, calib, val, **kw):
    imp = _imp()
    imp.accumulate(model, calib)
    return amp.AMPPruner(model, digit_images(1), imp, val, 3e-3, max_steps=3,
                         show_progress=False, **kw).step()


CALIB = [digit_images(16, offset=100 + 16 * i) for i in range(2)]
VAL = [digit_images(16, offset=16 * i) for i in range(2)]


# ---- batches of one image -----------------------------------------------------------------
def test_one_image_batches_are_refused():
    model = small_vit(depth=2, seed=1)
    imp = _imp()
    with pytest.raises(ValueError, match=r"batches: batch 0 holds 1 image; the entropy criteria "
                                         r"compare each image with the others of its batch"):
        imp.accumulate(model, [CALIB[0][:1], CALIB[0][1:2]])
    assert imp.num_batches == 0 and imp.neuron_scores() == {}
    imp.accumulate(model, CALIB)
    with pytest.raises(ValueError, match="val_batches: batch 1 holds 1 image"):
        amp.AMPPruner(model, digit_images(1), imp, [VAL[0], VAL[1][:1]], 3e-3)
    # a streamed loader is checked as the search reads it, before any MLP is decided
    before = _sizes(model)
    loader = DataLoader(digit_images(33), batch_size=16)  # 16, 16, 1
    with pytest.raises(ValueError, match="val_batches: batch 2 holds 1 image"):
        amp.AMPPruner(model, digit_images(1), imp, loader, 3e-3, show_progress=False).step()
    assert _sizes(model) == before


def test_calibration_pass_leaves_out_a_last_lone_image():
    """The pipeline's calibration loader never yields a one-image batch: 65 images at 32
    are read as 2 batches of 32, 66 as 32, 32 and 2."""
    images = digit_images(66)
    assert [len(b) for b in amp_loader(TensorItems(images[:65]), 32, 0, False)] == [32, 32]
    assert [len(b) for b in amp_loader(TensorItems(images), 32, 0, False)] == [32, 32, 2]
    assert calibration_images(65, 32) == 64 and calibration_images(66, 32) == 66


# ---- Torch-Pruning pruners ----------------------------------------------------------------
def test_torch_pruning_step_before_accumulate_is_refused():
    model = small_vit(depth=2, seed=2)
    before = _sizes(model)
    pruner = tp.pruner.MetaPruner(model, digit_images(1), importance=_imp(),
                                  pruning_ratio=0.5, customized_pruners=amp.customized_pruners())
    with pytest.raises(RuntimeError, match=r"AMPImportance has no scores: run "
                                           r"importance.accumulate\(model, calibration_batches\)"):
        pruner.step()
    assert _sizes(model) == before


def _eva02():
    torch.manual_seed(0)
    return timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=28,
                             patch_size=14, depth=2, embed_dim=64, num_heads=4,
                             num_classes=0).eval()


def test_eva02_pruner_built_before_the_gates_are_marked_is_refused():
    """The README's order without amp.prepare: the pruner's graph was built while the packed
    gate was a plain Linear, which Torch-Pruning prunes by halves."""
    model, x = _eva02(), digit_images(32, size=28)
    before = _sizes(model)
    imp = _imp()
    pruner = tp.pruner.MetaPruner(model, x[:1], importance=imp, pruning_ratio=0.5,
                                  customized_pruners=amp.customized_pruners())
    imp.accumulate(model, [x])
    with pytest.raises(RuntimeError, match=r"blocks.1.mlp has a packed gate .* call "
                                           r"amp.prepare\(model\) before building"):
        for group in pruner.step(interactive=True):
            group.prune()
    assert _sizes(model) == before
    # with amp.prepare first, the same flow prunes every MLP to half, gate and value alike
    model = _eva02()
    amp.prepare(model)
    imp = _imp()
    pruner = tp.pruner.MetaPruner(model, x[:1], importance=imp, pruning_ratio=0.5,
                                  customized_pruners=amp.customized_pruners())
    imp.accumulate(model, [x])
    for group in pruner.step(interactive=True):
        group.prune()
    half = {n: h - int(h * 0.5) for n, h in before.items()}
    assert _sizes(model) == half
    assert model.blocks[0].mlp.fc1.out_features == 2 * half["blocks.0.mlp"]


# ---- what a batch is --------------------------------------------------------------------
def test_one_tensor_is_one_batch():
    model = small_vit(depth=2, seed=3)
    a, b = _imp(), _imp()
    from_tensor = a.accumulate(model, CALIB[0])
    from_list = b.accumulate(model, [CALIB[0]])
    assert all(torch.equal(from_tensor[n], from_list[n]) for n in from_list)
    one = _prune(copy.deepcopy(model), CALIB[0], VAL[0])
    listed = _prune(copy.deepcopy(model), [CALIB[0]], [VAL[0]])
    assert one.hidden_sizes == listed.hidden_sizes and one.entropy == listed.entropy


def test_generators_are_read_once_and_exhausted_ones_refused():
    model = small_vit(depth=2, seed=4)
    by_list = _prune(copy.deepcopy(model), CALIB, VAL)
    by_generator = _prune(copy.deepcopy(model), (b for b in CALIB), (b for b in VAL))
    assert by_generator.hidden_sizes == by_list.hidden_sizes
    assert by_generator.entropy == by_list.entropy
    used = (b for b in CALIB)
    list(used)
    with pytest.raises(ValueError, match="batches: no batch .*iterator already read"):
        _imp().accumulate(model, used)
    imp = _imp()
    imp.accumulate(model, CALIB)
    used = (b for b in VAL)
    list(used)
    with pytest.raises(ValueError, match="val_batches: no batch"):
        amp.AMPPruner(model, digit_images(1), imp, used, 3e-3)


def test_validation_batches_of_different_shapes_are_refused():
    model = small_vit(depth=2, seed=4)
    imp = _imp()
    imp.accumulate(model, CALIB)
    with pytest.raises(ValueError, match=r"val_batches: batch 1 has shape \(8, 3, 32, 32\), "
                                         r"batch 0 \(16, 3, 32, 32\)"):
        amp.AMPPruner(model, digit_images(1), imp, [VAL[0], VAL[1][:8]], 3e-3)
    with pytest.raises(TypeError, match="val_batches: batch 0 is a str"):
        amp.AMPPruner(model, digit_images(1), imp, ["images"], 3e-3)


@pytest.mark.parametrize("value,error,message", [
    ("20", TypeError, "inv_temperature: expected a positive number (e.g. 20.0), got str '20'"),
    (True, TypeError, "inv_temperature: expected a positive number (e.g. 20.0), got bool"),
    (-1.0, ValueError, "inv_temperature: expected a positive finite number, got -1.0"),
    (float("nan"), ValueError, "inv_temperature: expected a positive finite number, got nan"),
])
def test_inv_temperature_is_checked(value, error, message):
    with pytest.raises(error) as err:
        amp.AMPImportance(inv_temperature=value)
    assert message in str(err.value)
    assert amp.AMPImportance(inv_temperature=20).inv_temperature == 20.0


# ---- non-finite values ------------------------------------------------------------------
def test_non_finite_calibration_is_located_where_the_scores_are_made():
    model = small_vit(depth=2, seed=5)
    bad = CALIB[1].clone()
    bad[3, 0, 5, 5] = float("nan")
    imp = _imp()
    with pytest.raises(NonFiniteError, match="score: calibration batch 1 holds NaN or inf"):
        imp.accumulate(model, [CALIB[0], bad])
    assert imp.neuron_scores() == {}
    overflow = copy.deepcopy(model)
    with torch.no_grad():
        overflow.blocks[1].mlp.fc1.weight.fill_(3e38)  # finite weights, infinite activations
    with pytest.raises(NonFiniteError, match="score: calibration batch 0: the output of module "
                                             "blocks.1.mlp.fc1 is the first non-finite value"):
        _imp().accumulate(overflow, CALIB)
    # scores loaded from elsewhere are checked before the search prunes anything
    scores = _imp().accumulate(model, CALIB)
    scores["blocks.0.mlp"][7] = float("inf")
    imp = _imp().load_scores(scores, model)
    before = _sizes(model)
    with pytest.raises(NonFiniteError, match="scores of blocks.0.mlp hold NaN or inf"):
        amp.AMPPruner(model, digit_images(1), imp, VAL, 3e-3, show_progress=False).step()
    assert _sizes(model) == before


# ---- the model's state --------------------------------------------------------------------
def test_train_mode_and_frozen_parameters_give_the_eval_answer():
    """Scoring and the search run in eval mode (dropout off) and need no parameter
    gradients: a model in train mode, or frozen, gives the same scores and sizes; its mode
    and flags are restored."""
    model = small_vit(depth=2, seed=6, drop_rate=0.5, proj_drop_rate=0.5)
    reference = _prune(copy.deepcopy(model), CALIB, VAL)
    trained = copy.deepcopy(model).train()
    result = _prune(trained, CALIB, VAL)
    assert trained.training and result.hidden_sizes == reference.hidden_sizes
    assert result.entropy == reference.entropy
    frozen = copy.deepcopy(model)
    frozen.blocks[0].requires_grad_(False)
    scores = _imp().accumulate(frozen, CALIB)
    expected = _imp().accumulate(model, CALIB)
    assert all(torch.equal(scores[n], expected[n]) for n in expected)
    assert [p.requires_grad for p in frozen.blocks[0].parameters()] == [False] * len(
        list(frozen.blocks[0].parameters()))
    assert all(p.requires_grad for p in frozen.blocks[1].parameters())


def test_pruned_model_second_step_and_meta_device_are_refused():
    model = small_vit(depth=2, seed=7)
    imp = _imp()
    imp.accumulate(model, CALIB)
    pruner = amp.AMPPruner(model, digit_images(1), imp, VAL, 1e-2, max_steps=3,
                           show_progress=False)
    first = pruner.step()
    assert first.hidden_sizes != first.original_sizes  # something was pruned
    with pytest.raises(RuntimeError, match=r"step\(\) was already called"):
        pruner.step()
    with pytest.raises(ValueError, match=r"scores of blocks.\d.mlp have 256 entries, the MLP "
                                         r"has \d+ neurons: the model was pruned after"):
        amp.AMPPruner(model, digit_images(1), imp, VAL, 1e-2, show_progress=False).step()
    assert _sizes(model) == first.hidden_sizes

    meta = small_vit(depth=2, seed=7).to("meta")
    with pytest.raises(ValueError, match="model: parameter cls_token is on the meta device"):
        _imp().accumulate(meta, CALIB)
    with pytest.raises(ValueError, match="model: parameter cls_token is on the meta device"):
        amp.AMPPruner(meta, digit_images(1), imp, VAL, 1e-2)
    with pytest.raises(TypeError, match="importance: expected an AMPImportance"):
        amp.AMPPruner(model, digit_images(1), tp.importance.GroupMagnitudeImportance(), VAL,
                      1e-2)


# ---- registries ---------------------------------------------------------------------------
def test_a_name_registered_twice_is_refused_unless_replaced():
    from amp_plugin.export import ExportFormat, get_format, register_format

    entropy = amp.criterion_info("entropy")
    with pytest.raises(ValueError, match="^criterion 'entropy' is already registered$"):
        amp.register_criterion("entropy")(lambda inv_temperature: None)
    assert amp.criterion_info("entropy") is entropy
    onnx = get_format("onnx")

    class Clash(ExportFormat):
        name = "onnx"

    with pytest.raises(ValueError, match="^export format 'onnx' is already registered$"):
        register_format(Clash)
    assert get_format("onnx") is onnx
    # a builder is replaced where that is asked for (to wrap it), and put back
    from amp_plugin.families.timm_vit import build_timm

    with pytest.raises(ValueError, match="^model library 'timm' is already registered$"):
        amp.register_builder("timm")(build_timm)
    built = []

    def counting(spec):
        built.append(spec.name)
        return build_timm(spec)

    spec = {"library": "timm", "name": "vit_small_patch16_224",
            "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1,
                       "num_heads": 2, "num_classes": 0}}
    amp.register_builder("timm", replace=True)(counting)
    try:
        amp.create_model(spec)
    finally:
        amp.register_builder("timm", replace=True)(build_timm)
    amp.create_model(spec)
    assert built == ["vit_small_patch16_224"]
    assert amp.list_builders() == ["timm", "open_clip", "transformers"]


def test_an_unknown_name_lists_the_known_ones():
    from amp_plugin.evaluate import get_task
    from amp_plugin.utils.registry import Registry

    registry: Registry[int] = Registry("size rule")
    registry.register("halve", 2)
    registry.decorator("third")(3)
    with pytest.raises(ValueError, match="^unknown size rule 'quarter'; expected one of "
                                         "halve, third$"):
        registry.get("quarter")
    assert registry.get("third") == 3
    assert list(registry) == registry.names() == ["halve", "third"]
    assert len(registry) == 2 and "halve" in registry and "quarter" not in registry
    with pytest.raises(ValueError, match="^unknown criterion 'nope'; expected one of entropy, "
                                         "clip_entropy, one_hot$"):
        amp.make_criterion("nope", 20.0)
    with pytest.raises(ValueError, match="^unknown eval task 'nope'; known: ") as err:
        get_task("nope")
    listed = str(err.value).split("known: ")[1].split(", ")
    assert sorted(listed) == sorted(amp.list_tasks()) and "knn" in listed
