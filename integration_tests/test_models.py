"""The paper's five models at real width with 2 blocks (EVA-CLIP-8B: 1) and random weights:
original-layout checkpoints load through the converters, AMP scores and prunes them, and the pruned
model reloads in a fresh process with identical outputs. Plus: scores with activation
checkpointing equal scores without, and every shipped recipe validates except for its
placeholder paths, which are named."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import amp_plugin as amp
from amp_plugin.core.models import ModelSpec, get_converter, load_weights
from amp_plugin.data import digits_raw, to_model_input
from amp_plugin.families.open_clip import model_config
from amp_plugin.run.recipe import RECIPES_DIR, RecipeError, load_recipe

SIZE = 28  # patch 14: a 2x2 grid plus the class token keeps real-width blocks cheap


def _open_clip(name: str) -> dict:
    # merged recursively into the config: only what changes
    return {"library": "open_clip", "name": name,
            "kwargs": {"vision_cfg": {"layers": 2, "image_size": SIZE},
                       "text_cfg": {"layers": 1}}}


def _zoo(name: str, depth: int = 2) -> dict:
    return {"library": "open_clip", "name": name, "kwargs": {
        "vision_cfg": {"image_size": SIZE, "timm_model_kwargs": {"depth": depth,
                                                                 "img_size": SIZE}},
        "text_cfg": {"layers": 1}}}


SPECS = {
    "open_clip_g": _open_clip("ViT-g-14"),
    "open_clip_bigG": _open_clip("ViT-bigG-14"),
    "eva_clip_E": _zoo("EVA02-E-14-plus"),
    # one 4096-wide block is 0.24B parameters: built, converted, pruned, saved and reloaded
    # once, where the other models take two
    "eva_clip_8B": _zoo("EVA-CLIP-8B", depth=1),
    "dinov2_g": {"library": "timm", "name": "vit_giant_patch14_dinov2",
                 "kwargs": {"depth": 2, "img_size": SIZE, "num_classes": 0}},
}
DEPTH = {key: 1 if key == "eva_clip_8B" else 2 for key in SPECS}
WIDTH_HIDDEN = {"open_clip_g": (1408, 6144), "open_clip_bigG": (1664, 8192),
                "eva_clip_E": (1792, 15360), "eva_clip_8B": (4096, 20480),
                "dinov2_g": (1536, 4096)}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    x, _ = digits_raw()
    return to_model_input(x[:20], SIZE, (0.5,) * 3, (0.5,) * 3)


def build(spec: dict, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return amp.create_model(spec).eval()


@torch.no_grad()
def embed(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What users consume: CLIP image embeddings, or the pooled features of a backbone."""
    if hasattr(model, "encode_image"):
        return model.encode_image(x)
    tower, adapter = amp.vision_tower(model)
    return adapter.features(tower, x)


# ---- original checkpoint layouts, synthesised from a model -------------------------------
def to_dinov2_layout(sd: dict, grid: int | None = None) -> dict:
    """timm DINOv2 names -> Meta's (w12/w3, mask_token); optionally a larger pos grid."""
    out = {re.sub(r"mlp\.fc1\.", "mlp.w12.", re.sub(r"mlp\.fc2\.", "mlp.w3.", k)): v.clone()
           for k, v in sd.items()}
    out["mask_token"] = torch.zeros(1, sd["cls_token"].shape[-1])
    if grid is not None:
        out["pos_embed"] = torch.randn(1, 1 + grid * grid, sd["cls_token"].shape[-1])
    return out


def to_baai_layout(sd: dict) -> dict:
    """open_clip CLIP with a timm Eva trunk -> BAAI EVA-CLIP names."""
    out = {}
    for k, v in sd.items():
        if k.startswith("visual.trunk."):
            k = "visual." + k.removeprefix("visual.trunk.")
            k = k.replace("mlp.norm.", "mlp.ffn_ln.").replace("attn.norm.", "attn.inner_attn_ln.")
            if k.endswith("attn.qkv.weight"):
                for name, part in zip("qkv", v.chunk(3, dim=0), strict=True):
                    out[k.replace("qkv.weight", f"{name}_proj.weight")] = part.clone()
                continue
        out[k] = v.clone()
    if any(k.endswith("attn.q_bias") for k in out):  # EVA02 towers carry rope buffers
        out["visual.rope.freqs_cos"] = torch.randn(4, 64)
        out["visual.rope.freqs_sin"] = torch.randn(4, 64)
    return out


def test_dinov2_original_layout(tmp_path: Path, images: torch.Tensor) -> None:
    spec = SPECS["dinov2_g"]
    src = build(spec, 0)
    sd = src.state_dict()
    assert sd["blocks.0.mlp.fc1.weight"].shape == (2 * 4096, 1536)  # packed gate
    file = tmp_path / "dinov2_vitg14_pretrain.pth"
    torch.save(to_dinov2_layout(sd), file)
    dst = build({**spec, "weights": str(file), "weights_format": "dinov2"}, 1)
    for k, v in sd.items():
        assert torch.equal(dst.state_dict()[k], v), k
    assert torch.equal(embed(dst, images), embed(src, images))

    # the MLP is the original SwiGLU: w3(silu(x1) * x2) with (x1, x2) = w12(x).chunk(2)
    orig = to_dinov2_layout(sd)
    x = torch.randn(3, 5, 1536)
    p = "blocks.1.mlp."
    x1, x2 = F.linear(x, orig[p + "w12.weight"], orig[p + "w12.bias"]).chunk(2, -1)
    want = F.linear(F.silu(x1) * x2, orig[p + "w3.weight"], orig[p + "w3.bias"])
    with torch.no_grad():
        torch.testing.assert_close(dst.blocks[1].mlp(x), want)

    # the released grid (37x37 at 518px) is resampled to the model's grid on load as DINOv2
    # resamples it at every forward: bicubic, no antialias, scale (2 + 0.1) / 37
    from timm.layers import resample_abs_pos_embed

    orig = to_dinov2_layout(sd, grid=37)
    torch.save(orig, file)
    dst = build({**spec, "weights": str(file), "weights_format": "dinov2"}, 1)
    grid = orig["pos_embed"][:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    resampled = F.interpolate(grid, scale_factor=2.1 / 37, mode="bicubic", antialias=False)
    assert resampled.shape[-2:] == (2, 2)
    want = torch.cat([orig["pos_embed"][:, :1], resampled.flatten(2).transpose(1, 2)], dim=1)
    torch.testing.assert_close(dst.pos_embed.data, want, rtol=0, atol=0)
    timm_way = resample_abs_pos_embed(orig["pos_embed"], new_size=(2, 2), old_size=(37, 37),
                                      num_prefix_tokens=1)
    assert not torch.allclose(timm_way, want)  # not the same function (antialias, scale)


def test_eva_clip_E_original_layout(tmp_path: Path, images: torch.Tensor) -> None:
    spec = SPECS["eva_clip_E"]
    model = build(spec, 0)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    baai = to_baai_layout(sd)
    assert "visual.blocks.0.attn.k_proj.weight" in baai and "visual.blocks.0.attn.q_bias" in baai
    assert "text.transformer.resblocks.0.mlp.c_fc.weight" in baai and "logit_scale" in baai
    file = tmp_path / "EVA02_CLIP_E_psz14_plus_s9B.pt"
    torch.save(baai, file)
    tokens = torch.randint(0, 49408, (2, 77))
    want_img, want_txt = embed(model, images), model.encode_text(tokens).detach()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    # the path create_model takes for a spec with weights
    load_weights(model, ModelSpec(**spec, weights=str(file), weights_format="eva_clip"))
    for k, v in sd.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert torch.equal(embed(model, images), want_img)
    with torch.no_grad():
        assert torch.equal(model.encode_text(tokens), want_txt)
        # the image-text criterion sees the projected embedding of the timm trunk
        joint = amp.AMPImportance().features(model, images, joint=True)
        assert torch.equal(joint, want_img)


def test_open_clip_local_file_never_downloads(tmp_path: Path, monkeypatch) -> None:
    """open_clip.create_model(name, pretrained=<file>) reads the file (no hub lookup: the
    tag table has no such tag, so the path branch is taken); our builder agrees."""
    import open_clip

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = model_config("ViT-B-32", {"vision_cfg": {"layers": 1}, "text_cfg": {"layers": 1}})
    kwargs = {"vision_cfg": cfg["vision_cfg"], "text_cfg": cfg["text_cfg"]}
    spec = {"library": "open_clip", "name": "ViT-B-32", "kwargs": kwargs}
    src = build(spec, 0)
    file = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(src.state_dict(), file)
    theirs = open_clip.create_model("ViT-B-32", pretrained=str(file), **kwargs)
    ours = build({**spec, "weights": str(file)}, 1)
    for k, v in src.state_dict().items():
        assert torch.equal(theirs.state_dict()[k], v) and torch.equal(ours.state_dict()[k], v)
    with pytest.raises(RuntimeError, match="not a known tag or valid file path"):
        open_clip.create_model("ViT-B-32", pretrained=str(tmp_path / "missing.bin"))


def _score_and_prune(model: torch.nn.Module, images: torch.Tensor) -> amp.PruneResult:
    calib, val = [images[:8]], [images[8:16]]
    imp = amp.AMPImportance(inv_temperature=20, show_progress=False)
    scores = imp.accumulate(model, calib)
    views = amp.find_mlps(amp.vision_tower(model)[0])
    assert {n: len(s) for n, s in scores.items()} == {n: v.hidden for n, v in views.items()}
    assert all(torch.isfinite(s).all() and (s >= 0).all() and s.sum() > 0
               for s in scores.values())
    result = amp.AMPPruner(model, images[:1], imp, val, threshold=1e-3, max_steps=4,
                           show_progress=False).step()
    for t in result.trace:  # the one-sided test of docs/algorithm.md section 3
        assert t.accepted == (t.entropy - t.reference <= 1e-3)
    return result


_RELOAD = textwrap.dedent("""
    import sys, torch
    import amp_plugin as amp
    torch.set_num_threads(int(sys.argv[1]))  # the test's: equal outputs, bit for bit
    for folder in sys.argv[2:]:
        model = amp.load_pruned(folder + "/pruned")
        x = torch.load(folder + "/x.pt")
        tower, adapter = amp.vision_tower(model)
        with torch.no_grad():
            out = model.encode_image(x) if hasattr(model, "encode_image") else \\
                adapter.features(tower, x)
        sizes = {n: v.hidden for n, v in amp.find_mlps(tower).items()}
        torch.save({"out": out, "sizes": sizes}, folder + "/reloaded.pt")
        del model, tower
""")


def _eva_clip_8b_from_baai_layout(images: torch.Tensor) -> torch.nn.Module:
    """EVA-CLIP-8B: a BAAI-layout state dict loads into the zoo model through the converter
    (built once and kept in memory: its parameters are wiped, then reloaded)."""
    model = build(SPECS["eva_clip_8B"], 0)
    baai = to_baai_layout(model.state_dict())
    assert "visual.blocks.0.attn.q_proj.weight" in baai and "visual.head.weight" in baai
    assert not any(k.endswith(("q_bias", "v_bias")) for k in baai)  # no q/k/v bias
    want = embed(model, images)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    model.load_state_dict(get_converter("eva_clip")(baai, model), strict=True)
    del baai
    assert torch.equal(embed(model, images), want)
    return model


@pytest.mark.parametrize("key", list(SPECS))
def test_prune_save_and_reload(key: str, tmp_path: Path, images: torch.Tensor) -> None:
    """Each paper model (real width, reduced depth) is scored, pruned, saved and reloaded
    in a fresh process, which gives the same sizes and, bit for bit, the same outputs."""
    folder = tmp_path
    if key == "eva_clip_8B":
        model = _eva_clip_8b_from_baai_layout(images)
    else:
        model = build(SPECS[key], 0)
    tower, _ = amp.vision_tower(model)
    width, hidden = WIDTH_HIDDEN[key]
    views = amp.find_mlps(tower)
    assert len(views) == DEPTH[key] and all(v.hidden == hidden and v.output.out_features == width
                                   for v in views.values())
    result = _score_and_prune(model, images)
    sizes = {n: v.hidden for n, v in amp.find_mlps(tower).items()}
    assert sizes == result.hidden_sizes
    assert all(1 <= s <= hidden for s in sizes.values())
    assert result.params["after"] == sum(p.numel() for p in tower.parameters())
    removed = sum(hidden - s for s in sizes.values())
    # fc1 row (+ bias) and fc2 column; a packed gate loses a second fc1 row
    per_neuron = 2 * width + 1 + (width + 1 if key == "dinov2_g" else 0)
    assert result.params["before"] - result.params["after"] == removed * per_neuron
    if hasattr(model, "encode_text"):  # zero-shot works for every CLIP, EVA-CLIP-8B included
        from amp_plugin.evaluate import text_classifier

        tokenizer = amp.get_adapter(model).tokenizer(model)
        clf = text_classifier(model, tokenizer, ["zero", "one"], ["a photo of the digit {c}."])
        with torch.no_grad():
            dim = model.encode_text(tokenizer(["a digit"])).shape[-1]
        assert clf.shape == (dim, 2) and (key != "eva_clip_8B" or dim == 1280)

    x = images[16:20]
    torch.save(x, folder / "x.pt")
    torch.save({"out": embed(model, x), "sizes": sizes}, folder / "expected.pt")
    amp.save_pruned(model, folder / "pruned")
    del model, tower, views
    subprocess.run([sys.executable, "-c", _RELOAD, str(torch.get_num_threads()), str(folder)],
                   check=True, timeout=900)
    want, got = torch.load(folder / "expected.pt"), torch.load(folder / "reloaded.pt")
    assert got["sizes"] == want["sizes"]
    assert torch.equal(got["out"], want["out"])
    shutil.rmtree(folder / "pruned")  # the 1-block EVA-CLIP-8B alone is 1.3 GB


# ---- activation checkpointing ----------------------------------------------------------
CKPT_SPECS = {
    "timm_vit_glu": {"library": "timm", "name": "vit_giant_patch14_dinov2", "kwargs": {
        "depth": 2, "img_size": SIZE, "embed_dim": 96, "num_heads": 4, "num_classes": 0}},
    "open_clip_vit": {"library": "open_clip", "name": "ViT-B-32", "kwargs": {
        "image_only": True, "vision_cfg": {"layers": 2, "width": 96, "head_width": 24,
                                           "patch_size": 8, "image_size": 32}}},
    "timm_eva_postnorm_rope": {"library": "open_clip", "name": "EVA02-E-14-plus", "kwargs": {
        "image_only": True, "vision_cfg": {"image_size": SIZE, "timm_model_kwargs": {
            "depth": 2, "img_size": SIZE, "embed_dim": 128, "num_heads": 4,
            "use_rot_pos_emb": True}}}},
}


@pytest.mark.parametrize("key", list(CKPT_SPECS))
def test_checkpointing_keeps_scores(key: str) -> None:
    spec = CKPT_SPECS[key]
    model = build(spec, 0)
    x, _ = digits_raw()
    size = 32 if key == "open_clip_vit" else SIZE
    batches = [to_model_input(x[i:i + 8], size, (0.5,) * 3, (0.5,) * 3) for i in (0, 8)]
    plain = amp.AMPImportance(20, show_progress=False).accumulate(model, batches)
    tower, adapter = amp.vision_tower(model)
    adapter.set_grad_checkpointing(tower, True)
    ran = []
    handles = [blk.register_forward_pre_hook(lambda *_: ran.append(torch.is_grad_enabled()))
               for blk in adapter.blocks(tower)]
    ckpt = amp.AMPImportance(20, show_progress=False).accumulate(model, batches)
    for h in handles:
        h.remove()
    # checkpointing is really on: each block starts twice per batch (forward, recompute)
    assert len(ran) == 2 * 2 * len(adapter.blocks(tower))
    assert plain.keys() == ckpt.keys()
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-4, atol=1e-7)


# ---- recipes -----------------------------------------------------------------------------
RECIPES = ["open_clip_g", "open_clip_bigG", "eva_clip_E", "eva_clip_8B", "dinov2_g"]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_validates_except_placeholders(name: str, tmp_path: Path) -> None:
    # the settings themselves: test_authors.py
    r = load_recipe(name, check_paths=False)
    clip = r.data.kind == "coco"
    placeholders = r.required_paths()
    assert "model.weights" in placeholders and "data.root" in placeholders
    assert ("data.captions" in placeholders) == clip
    text = (RECIPES_DIR / f"{name}.yaml").read_text()
    header = text.split("\nname:")[0]
    for key in placeholders:
        assert key in header, f"{key} is not documented at the top of {name}.yaml"

    with pytest.raises(RecipeError) as err:
        load_recipe(name)
    msg = str(err.value)
    for key, path in placeholders.items():
        assert f"{key}: {path} does not exist" in msg

    # with every named input present, the recipe is valid as shipped
    overrides = {}
    for key, path in placeholders.items():
        target = tmp_path / Path(path).name
        if key == "data.captions" or key == "model.weights":
            target.write_text("{}")
        else:
            target.mkdir()
        overrides[key] = str(target)
    assert load_recipe(name, overrides).name == name


# ---- COCO captions for the image-text criterion ------------------------------------------
def _coco(tmp_path: Path, n: int) -> tuple[Path, Path, list[list[str]]]:
    """A COCO-format captions file over n digits images written as PNG files."""
    from PIL import Image

    root = tmp_path / "train2014"
    root.mkdir()
    x, y = digits_raw()
    images, annotations, captions = [], [], []
    for i in range(n):
        name = f"COCO_train2014_{i:012d}.jpg"
        Image.fromarray((x[i, 0].numpy() * 255).astype("uint8")).convert("RGB").save(
            root / name, format="PNG")
        images.append({"id": 1000 + i, "file_name": name, "height": 8, "width": 8})
        caps = [f"photo {i}: the digit {int(y[i])}", f"image {i}, a handwritten {int(y[i])}"]
        annotations += [{"id": 2 * i + j, "image_id": 1000 + i, "caption": c}
                        for j, c in enumerate(caps)]
        captions.append(caps)
    file = tmp_path / "captions_train2014.json"
    file.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations}))
    return root, file, captions


def test_caption_batches_feed_clip_entropy(tmp_path: Path) -> None:
    import open_clip

    from amp_plugin.data import get_source
    from amp_plugin.data.coco import caption_datasets

    root, file, captions = _coco(tmp_path, 20)
    cfg = model_config("ViT-B-32", {"vision_cfg": {"layers": 1, "image_size": 64},
                                    "text_cfg": {"layers": 1}})
    spec = {"library": "open_clip", "name": "ViT-B-32",
            "kwargs": {"vision_cfg": cfg["vision_cfg"], "text_cfg": cfg["text_cfg"]}}
    model = build(spec, 0)
    r = amp.Recipe.model_validate({
        "name": "coco", "output_dir": str(tmp_path / "run"), "model": spec,
        "data": {"kind": "coco", "root": str(root), "captions": str(file), "image_size": 64,
                 "calib_images": 10, "val_images": 10, "batch_size": 4, "workers": 0},
        "amp": {"criterion": "clip_entropy", "inv_temperature": 15}})
    calib, val = get_source("coco").amp_batches(r.data, r.seed, model=model,
                                                show_progress=False)
    assert [len(b[0]) for b in calib] == [4, 4, 2]  # calibration keeps its last batch
    assert [len(b[0]) for b in val] == [4, 4]  # validation drops it
    assert calib[0][0].shape == (4, 3, 64, 64) and calib[0][1].shape == (4, 512)
    assert not any(t.requires_grad for _, t in calib + val)

    # each text feature is the text tower on one caption of the image it is paired with
    from PIL import Image
    from torchvision import transforms

    tok = open_clip.get_tokenizer("ViT-B-32")
    flat = [(i, c) for i, caps in enumerate(captions) for c in caps]
    with torch.no_grad():
        all_text = model.encode_text(tok([c for _, c in flat]))
    tf = transforms.Compose([
        transforms.Resize(64, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(64), transforms.ToTensor(),
        transforms.Normalize(r.data.mean, r.data.std)])
    used = []
    for images, text in calib + val:
        for im, t in zip(images, text, strict=True):
            j = int((all_text - t).abs().amax(dim=1).argmin())
            torch.testing.assert_close(t, all_text[j], atol=1e-5, rtol=0)
            i = flat[j][0]
            with Image.open(root / f"COCO_train2014_{i:012d}.jpg") as f:
                assert torch.equal(im, tf(f.convert("RGB")))
            used.append(i)
    assert len(set(used)) == len(used) == 18  # calibration and validation are disjoint
    # scoring with the image-text criterion runs on these batches
    imp = amp.AMPImportance(15, criterion="clip_entropy", show_progress=False)
    scores = imp.accumulate(model, calib)
    assert all(s.sum() > 0 for s in scores.values())
    # images meet texts in the joint space: the tower's projected embedding
    with torch.no_grad():
        assert torch.equal(imp.features(model, val[0][0], joint=True),
                           model.encode_image(val[0][0]))
        want = sum(float(amp.clip_entropy_loss(model.encode_image(im), t, 15))
                   for im, t in val) / len(val)
    result = amp.AMPPruner(model, val[0][0][:1], imp, val, threshold=1e-2,
                           show_progress=False).step()
    assert result.entropy["before"] == pytest.approx(want, rel=1e-5)

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="data.captions: .*bad.json is not a COCO captions"):
        caption_datasets(r.data.model_copy(update={"captions": str(bad)}), r.seed, model)
