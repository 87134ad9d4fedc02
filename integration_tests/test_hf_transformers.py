"""Hugging Face transformers vision encoders, end to end: each model small (2 layers, width
64, 32x32 images, random weights), written with `save_pretrained` to a folder and read from
it offline, then scored, searched, pruned, saved, and reloaded in a fresh process with
outputs equal; hub ids and remote code refused before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import digit_images
from safetensors.torch import load_file

import amp_plugin as amp
from amp_plugin.families.transformers_vision import tiny_spec

# every registered transformers adapter, by its example, plus DINOv2's SwiGLU variant (the
# giant model's MLP)
CASES = {a.family: a.example for a in amp.list_adapters()
         if a.example and a.example["library"] == "transformers"}
CASES["hf_dinov2_swiglu"] = tiny_spec("Dinov2Model", mlp_ratio=2, use_swiglu_ffn=True)
# a proxy nothing listens on: any attempt to reach the network fails at once
OFFLINE = {"HF_HUB_OFFLINE": "1", "HTTPS_PROXY": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9"}


@dataclass
class Case:
    folder: Path            # written by save_pretrained
    saved: Path             # written by save_pruned
    before: dict[str, int]  # hidden sizes
    after: dict[str, int]
    want: torch.Tensor      # the pruned model's features of IMAGES


IMAGES = digit_images(96)
# the pooled embedding each family's users take, from the model's own forward
POOLED = {
    "CLIPVisionModel": lambda m, x: m(pixel_values=x).pooler_output,
    "CLIPModel": lambda m, x: m.vision_model(pixel_values=x).pooler_output,
    "SiglipVisionModel": lambda m, x: m(pixel_values=x).pooler_output,  # the MAP head's
    "SiglipModel": lambda m, x: m.vision_model(pixel_values=x).pooler_output,
    "Dinov2Model": lambda m, x: m(pixel_values=x).pooler_output,  # CLS after layernorm
    "ViTModel": lambda m, x: m(pixel_values=x).last_hidden_state[:, 0],  # the classifier's
}
_done: dict[str, Case] = {}


def features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    tower, adapter = amp.vision_tower(model)
    with torch.no_grad():
        return adapter.features(tower, x)


def run_case(name: str, root: Path) -> Case:
    """Build, save_pretrained, read back offline, score, search, prune, save_pruned."""
    if name in _done:
        return _done[name]
    torch.manual_seed(0)
    original = amp.create_model(CASES[name]).eval()
    folder = root / name / "hf"
    original.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    model = amp.create_model({"library": "transformers", "name": "auto", "path": str(folder)})
    assert type(model) is type(original)
    x = IMAGES
    torch.testing.assert_close(features(model, x[:8]), features(original, x[:8]), rtol=0,
                               atol=0)
    with torch.no_grad():
        torch.testing.assert_close(features(model, x[:8]),
                                   POOLED[type(model).__name__](model, x[:8]))

    tower, adapter = amp.vision_tower(model)
    views = amp.find_mlps(tower)
    assert views and {v.kind for v in views.values()} <= {"hf_mlp", "hf_swiglu"}
    before = {n: v.hidden for n, v in views.items()}
    imp = amp.AMPImportance(20.0, show_progress=False)
    scores = imp.accumulate(model, [x[:32]])
    assert set(scores) == set(views)
    assert all(len(s) == views[n].hidden and torch.isfinite(s).all() for n, s in scores.items())
    result = amp.AMPPruner(model, x[:1], imp, [x[32:64], x[64:]], threshold=0.5, max_steps=3,
                           show_progress=False).step()
    after = {n: v.hidden for n, v in amp.find_mlps(tower).items()}
    assert result.hidden_sizes == after
    head = {n for n, v in views.items() if adapter.in_head(tower, v.module)}
    assert result.kept_whole.keys() == head and all(after[n] == before[n] for n in head)
    assert any(after[n] < before[n] for n in before if n not in head)  # it did prune
    want = features(model, x[:8])
    saved = amp.save_pruned(model, root / name / "pruned")
    manifest = json.loads((saved / "amp.json").read_text())
    assert manifest["hidden_sizes"] == after
    assert manifest["spec"]["name"] == type(original).__name__  # "auto" resolved
    assert "path" not in manifest["spec"] and "config" in manifest["spec"]["kwargs"]
    _done[name] = Case(folder, saved, before, after, want)
    return _done[name]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf")


@pytest.mark.parametrize("name", list(CASES))
def test_transformers_model_end_to_end(name, root):
    case = run_case(name, root)
    loaded = amp.load_pruned(case.saved)
    torch.testing.assert_close(features(loaded, IMAGES[:8]), case.want, rtol=0, atol=1e-6)
    assert {n: v.hidden for n, v in amp.find_mlps(amp.vision_tower(loaded)[0]).items()} \
        == case.after


_FRESH = """
import sys, torch
from safetensors.torch import save_file
import amp_plugin as amp
x = torch.load(sys.argv[1])
out = {}
for name, path in zip(sys.argv[3::2], sys.argv[4::2]):
    model = amp.load_pruned(path)
    tower, adapter = amp.vision_tower(model)
    with torch.no_grad():
        out[name] = adapter.features(tower, x).contiguous()
save_file(out, sys.argv[2])
"""


def test_pruned_models_reload_in_a_fresh_process(root, tmp_path):
    cases = {name: run_case(name, root) for name in CASES}
    torch.save(IMAGES[:8], tmp_path / "x.pt")
    args = [a for name, case in cases.items() for a in (name, str(case.saved))]
    proc = subprocess.run([sys.executable, "-c", _FRESH, str(tmp_path / "x.pt"),
                           str(tmp_path / "out.safetensors"), *args],
                          env={**os.environ, **OFFLINE}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = load_file(str(tmp_path / "out.safetensors"))
    assert set(got) == set(cases)
    for name, case in cases.items():
        torch.testing.assert_close(got[name], case.want, rtol=0, atol=1e-5, msg=name)


def test_clip_model_projects_into_the_joint_space(root):
    """CLIPModel: AMP measures the vision tower's pooler_output; a criterion that compares
    images with text gets image_embeds (after visual_projection)."""
    model = amp.create_model({"library": "transformers", "name": "auto",
                              "path": str(run_case("hf_clip", root).folder)})
    tower, adapter = amp.vision_tower(model)
    x = IMAGES[:8]
    with torch.no_grad():
        pooled = adapter.features(tower, x)
        torch.testing.assert_close(pooled, model.vision_model(pixel_values=x).pooler_output)
        torch.testing.assert_close(adapter.project(tower, pooled),
                                   model.get_image_features(pixel_values=x).pooler_output)
    imp = amp.AMPImportance(20.0, criterion="clip_entropy", show_progress=False)
    assert imp.projects(True)


# ---- refusals: before any work, nothing imported on the spec's word ------------------------
def _refused(spec: dict, message: str) -> None:
    modules = set(sys.modules)
    with pytest.raises(ValueError, match=message):
        amp.create_model(spec)
    assert set(sys.modules) - modules == set()


@pytest.mark.parametrize("path", ["facebook/dinov2-small", "hf-hub:facebook/dinov2-small",
                                  "https://huggingface.co/facebook/dinov2-small"])
def test_hub_ids_and_urls_are_refused(path):
    _refused({"library": "transformers", "name": "auto", "path": path},
             "(path: 'facebook/dinov2-small' is not a local folder|names a model hub or URL)")


def test_trust_remote_code_is_refused_anywhere_in_a_spec(tmp_path):
    spec = tiny_spec("Dinov2Model", mlp_ratio=2)
    _refused({**spec, "kwargs": {**spec["kwargs"], "trust_remote_code": True}},
             r"kwargs.trust_remote_code: True would run code shipped with a checkpoint")
    _refused({**spec, "kwargs": {"config": {"model_type": "dinov2",
                                            "extra": {"trust_remote_code": True}}}},
             r"kwargs.config.extra.trust_remote_code: True would run code")
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "dinov2", "auto_map": {"AutoModel": "modeling_x.Model"}}))
    _refused({"library": "transformers", "name": "auto", "path": str(folder)},
             r"config.json.auto_map: .* would run code shipped with a checkpoint")


@pytest.mark.parametrize("config,message", [
    (b"{broken", r"path: .*config.json: not valid JSON \(Expecting"),
    (b"\xff\xfe", r"path: .*config.json: not valid JSON \('utf-8' codec"),
    (b"[1, 2]", r"path: .*config.json: expected a JSON object, got list"),
])
def test_a_folder_whose_config_is_not_a_json_object_is_refused(tmp_path, config, message):
    (tmp_path / "config.json").write_bytes(config)
    _refused({"library": "transformers", "name": "auto", "path": str(tmp_path)}, message)


def test_a_manifest_with_remote_code_is_refused_before_anything_is_imported(root, tmp_path):
    case = run_case("hf_vit", root)
    path = tmp_path / "m"
    path.mkdir()
    (path / "model.safetensors").write_bytes((case.saved / "model.safetensors").read_bytes())
    manifest = json.loads((case.saved / "amp.json").read_text())
    manifest["spec"]["kwargs"]["config"]["trust_remote_code"] = True
    (path / "amp.json").write_text(json.dumps(manifest))
    modules = set(sys.modules)
    with pytest.raises(ValueError, match=r"amp.json: refused: spec.kwargs.config."
                                         r"trust_remote_code: True would run code"):
        amp.load_pruned(path)
    assert set(sys.modules) - modules == set()


def test_a_folder_without_safetensors_is_refused(root, tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_bytes((run_case("hf_vit", root).folder
                                          / "config.json").read_bytes())
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match=r"has no model.safetensors .* from safetensors only"):
        amp.create_model({"library": "transformers", "name": "auto", "path": str(folder)})
    with pytest.raises(ValueError, match=r"name: 'CLIPVisionModel' is not|takes a "
                                         r"'clip_vision_model' config, but .* 'vit'"):
        amp.create_model({"library": "transformers", "name": "CLIPVisionModel",
                          "path": str(folder)})


# ---- recipes: model.library transformers, amp plan on the meta device ---------------------
def _recipe(tmp_path: Path, model: str) -> Path:
    recipe = tmp_path / "hf.yaml"
    recipe.write_text(f"name: hf\noutput_dir: runs/hf\nmodel: {model}\n"
                      "data: {kind: digits, image_size: 32}\n")
    return recipe


def test_amp_plan_of_a_transformers_recipe_reads_only_the_config(tmp_path):
    from transformers import Dinov2Config

    from amp_plugin.core.cost import count_params
    from amp_plugin.run.plan import plan
    from amp_plugin.run.recipe import load_recipe

    spec = tiny_spec("Dinov2Model", mlp_ratio=2, use_swiglu_ffn=True)
    Dinov2Config(**spec["kwargs"]).save_pretrained(tmp_path / "dinov2")  # no weights
    assert [p.name for p in (tmp_path / "dinov2").iterdir()] == ["config.json"]
    # a relative model.path resolves against the recipe's folder
    r = load_recipe(_recipe(tmp_path, "{library: transformers, name: auto, path: dinov2}"))
    assert r.model.path == str(tmp_path / "dinov2")
    p = plan(r)
    torch.manual_seed(0)
    model = amp.create_model(spec)
    views = amp.find_mlps(amp.vision_tower(model)[0])
    assert p["params"] == count_params(model)
    assert p["mlp_params"] == sum(v.num_params() for v in views.values())
    assert p["mlps"] == [{"name": n, "hidden": v.hidden, "kind": "hf_swiglu"}
                         for n, v in views.items()]
    assert (p["blocks"], p["width"], p["tokens"]) == (2, 64, 1 + 4 * 4)
    with pytest.raises(ValueError, match="has no model.safetensors"):  # amp run needs weights
        amp.create_model(r.model)


@pytest.mark.parametrize("model,message", [
    ("{library: transformers, name: auto, path: no/such/folder}",
     r"model.path: .*no/such/folder does not exist"),
    ("{library: transformers, name: auto, path: 'hf-hub:facebook/dinov2-small'}",
     r"model.path: Value error, 'hf-hub:facebook/dinov2-small' names a model hub"),
    ("{library: transformers, name: Dinov2Model, kwargs: {trust_remote_code: true}}",
     r"model.kwargs.trust_remote_code: True would run code shipped with a checkpoint"),
])
def test_a_transformers_recipe_is_refused_with_the_key_path(tmp_path, model, message):
    from amp_plugin.run.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=message):
        load_recipe(_recipe(tmp_path, model))


def test_dinov2_giant_recipe_plans_the_papers_model(tmp_path):
    """recipes/dinov2_g_hf.yaml with a config.json of DINOv2 ViT-g/14 (transformers'
    layout, no weights): the paper's 1.14B parameters and 40 SwiGLU MLPs of 4096."""
    from transformers import Dinov2Config

    from amp_plugin.run.plan import plan
    from amp_plugin.run.recipe import load_recipe

    Dinov2Config(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, mlp_ratio=4,
                 use_swiglu_ffn=True, patch_size=14, image_size=518).save_pretrained(
                     tmp_path / "giant")
    p = plan(load_recipe("dinov2_g_hf", {"model.path": str(tmp_path / "giant")},
                         check_paths=False))
    assert p["params"] == pytest.approx(1.14e9, rel=0.01)
    assert (p["blocks"], p["width"], p["tokens"]) == (40, 1536, 257)
    assert {(m["hidden"], m["kind"]) for m in p["mlps"]} == {(4096, "hf_swiglu")}
    assert p["mlp_params"] == 40 * (2 * (1536 + 1) * 4096 + (4096 + 1) * 1536)
