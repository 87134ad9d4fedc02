"""`amp plan`: the paper's figures from the architectures alone (meta device), FLOPs equal
to a hand count, the MLP inventory, the search cost, and the CLI's table and JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from amp_cli.app import app
from typer.testing import CliRunner

import amp_plugin as amp
from amp_plugin.core.cost import count_params
from amp_plugin.run.plan import (
    global_cost,
    greedy_block_forwards,
    plan,
    refinement_points,
    search_cost,
)
from amp_plugin.run.recipe import load_recipe

# recipe: (paper params, paper FLOPs or None, blocks, width, MLP hidden, packed gate)
PAPER = {
    "open_clip_g": (1.01e9, 0.52e12, 40, 1408, 6144, False),
    "open_clip_bigG": (1.84e9, 0.95e12, 48, 1664, 8192, False),
    "eva_clip_E": (4.35e9, 2.23e12, 64, 1792, 15360, False),
    "eva_clip_8B": (7.53e9, 3.86e12, 32, 4096, 20480, False),
    "dinov2_g": (1.14e9, None, 40, 1536, 4096, True),
}
KIND = {"open_clip_g": "open_clip_mlp", "open_clip_bigG": "open_clip_mlp",
        "eva_clip_E": "timm_mlp", "eva_clip_8B": "timm_mlp", "dinov2_g": "timm_glu_packed"}


def hand_flops(blocks: int, width: int, hidden: int, packed: bool, tokens: int = 257,
               patch: int = 14) -> int:
    """2 x multiply-adds of one 224px image: patch embedding, q/k/v/out projections, the
    two attention products and the MLP (a packed gate has 2*hidden fc1 outputs)."""
    patches = tokens - 1
    mlp = width * hidden * (3 if packed else 2)
    per_block = tokens * (4 * width * width + mlp) + 2 * tokens * tokens * width
    return 2 * (patches * 3 * patch * patch * width + blocks * per_block)


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_figures(name: str) -> None:
    params, flops, blocks, width, hidden, packed = PAPER[name]
    p = plan(load_recipe(name, check_paths=False))
    assert p["params"] == pytest.approx(params, rel=0.01)
    if flops is not None:
        assert p["flops"] == pytest.approx(flops, rel=0.05)
    assert p["flops"] == hand_flops(blocks, width, hidden, packed)
    assert (p["blocks"], p["width"], p["tokens"]) == (blocks, width, 257)
    assert len(p["mlps"]) == blocks and {m["hidden"] for m in p["mlps"]} == {hidden}
    per_mlp = (2 if packed else 1) * (width + 1) * hidden + (hidden + 1) * width
    assert p["mlp_params"] == blocks * per_mlp
    [row] = p["inventory"]
    assert (row["count"], row["hidden"]) == (blocks, hidden)
    assert row["kind"] == KIND[name] and {m["kind"] for m in p["mlps"]} == {KIND[name]}
    assert row["share_of_params"] == pytest.approx(p["mlp_params"] / p["params"])
    s = p["search"]
    # the authors' data: all of ImageNet-1k train once, all of val at every trial, in
    # global batches of 128 per GPU x 8 (64 x 8 for the EVA models)
    batch = 512 if name.startswith("eva") else 1024
    assert s["calibration"]["images"] == 1_281_167
    assert s["calibration"]["forward_backward_passes"] == math.ceil(1_281_167 / batch)
    assert s["validation"]["images"] == 50_000 // batch * batch
    assert len(s["assumed"]) == 2  # the folders are placeholders: ImageNet-1k's sizes
    assert s["validation"]["full_forward_passes_reference"] == blocks * 6 + 1
    assert s["validation"]["full_forward_equivalents_cached"] == pytest.approx(
        1 + 6 * (blocks + 1) / 2, abs=0.05)


def test_meta_plan_equals_a_real_build() -> None:
    """The meta-device count is the count of the model that score/prune will build."""
    r = load_recipe("dinov2_g", {"model.kwargs.depth": 2, "model.kwargs.img_size": 56,
                                 "data.image_size": 56}, check_paths=False)
    p = plan(r)
    model = amp.create_model(r.model.model_copy(update={"weights": None}))
    assert p["params"] == count_params(model)
    assert p["mlp_params"] == sum(v.num_params() for v in amp.find_mlps(model).values())
    assert p["tokens"] == 1 + 4 * 4


def test_whole_folders_are_counted(tmp_path: Path) -> None:
    """`all` counts the images of a folder that exists; calibration is the whole train
    folder, validation the whole val folder."""
    from amp_plugin.data import get_source

    data = get_source("imagefolder").example(tmp_path)
    r = load_recipe("open_clip_g", {**{f"data.{k}": data[k] for k in ("root", "val_root")},
                                    "data.val_from": "val_root", "data.calib_images": "all",
                                    "data.val_images": "all", "data.batch_size": 25},
                    check_paths=False)
    s = plan(r)["search"]
    assert s["assumed"] == []
    assert s["calibration"]["images"] == 300 and s["validation"]["images"] == 100


def test_search_cost_counts() -> None:
    c = search_cost(n_blocks=4, max_steps=3, calib_images=300, val_images=300, batch_size=128)
    assert c["calibration"]["batches"] == 3  # the last partial calibration batch is kept
    assert c["validation"]["batches"] == 2  # the last partial validation batch is dropped
    assert c["validation"]["entropy_evaluations"] == {"usual": 13, "at_most": 16}
    # cache fill + trials over blocks 3..0 running 1, 2, 3, 4 of the 4 blocks
    assert c["validation"]["full_forward_equivalents_cached"] == 1 + 3 * (1 + 2 + 3 + 4) / 4


def test_cli_table_and_json(tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    done = CliRunner().invoke(app, ["plan", "eva_clip_8B", "--json", str(out)],
                              env={"COLUMNS": "160"})
    assert done.exit_code == 0, done.output
    for text in ("7.53B", "MLP inventory", "20480", "timm_mlp", "search cost", "FlopCounterMode"):
        assert text in done.stdout
    assert "note: model.weights: /path/to/EVA-CLIP-8B" in done.stderr
    data = json.loads(out.read_text())
    assert {"params", "flops", "mlp_params", "mlps"} <= data.keys()
    assert data["params"] == 7_526_088_704  # bias-free head and fused bias-free qkv
    assert data["mlps"][0] == {"name": "trunk.blocks.0.mlp", "hidden": 20480, "kind": "timm_mlp"}


def test_cli_bad_recipe_names_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\noutput_dir: runs/x\nmodel: {library: timm, name: vit_base_patch16_224}"
                   "\namp: {threshold: lots}\n")
    done = CliRunner().invoke(app, ["plan", str(bad)])
    assert done.exit_code == 2
    assert "amp.threshold" in done.stderr


def test_plan_builds_what_run_builds_with_nested_kwargs(tmp_path):
    """One builder for `amp plan` (meta device) and `amp run`: nested overrides such as
    `vision_cfg: {layers: 2}` merge into the config for both."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({
        "name": "nested", "output_dir": str(tmp_path / "run"),
        "model": {"library": "open_clip", "name": "ViT-B-32",
                  "kwargs": {"vision_cfg": {"layers": 2}, "text_cfg": {"layers": 1}}},
        "data": {"image_size": 224}}))
    r = load_recipe(recipe)
    p = plan(r)
    model = amp.create_model(r.model)
    tower, _ = amp.vision_tower(model)
    assert p["blocks"] == 2 == len(tower.transformer.resblocks)
    assert p["params"] == count_params(tower)
    assert p["width"] == 768  # the rest of ViT-B-32's vision_cfg is kept, not replaced
    assert len(model.transformer.resblocks) == 1


def test_cost_at_imagenet_scale() -> None:
    """ViT-g at the authors' data size on 8 ranks: FLOPs and cache bytes per mode."""
    r = load_recipe("open_clip_g", {"data.calib_images": 1281167, "data.val_images": 50000},
                    check_paths=False)
    p = plan(r, ranks=8)
    a = p["search"]["at_data_size"]
    v = 50000 // r.data.batch_size * r.data.batch_size
    per_block = 257 * 1408 * 2 * math.ceil(v / 8)  # tokens x width x bf16, one rank's shard
    assert a["val_images"] == v and a["ranks"] == 8
    assert a["flops"]["score"] == 2 * p["flops"] * 1281167
    assert a["flops"]["search_reference"] == (40 * 6 + 1) * p["flops"] * v
    assert a["flops"]["search_cached"] == pytest.approx((1 + 6 * 41 / 2) * p["flops"] * v)
    assert a["cache_bytes_per_rank"]["full"] == 40 * per_block
    # checkpoints at blocks 0, 7, ..., 35 (every ceil(sqrt(40)) = 7th) + the searched block
    assert a["cache_bytes_per_rank"]["checkpointed"] == 7 * per_block
    recompute = sum(i % 7 for i in range(35)) + sum(range(5))
    assert a["flops"]["search_checkpointed"] == pytest.approx(
        a["flops"]["search_cached"] + recompute * p["flops"] / 40 * v)
    assert a["cache_bytes_per_rank"]["budget"] == (2 + 8 + 64) * 2**30
    assert a["chosen"] == {"mode": "checkpointed", "bytes": 7 * per_block,
                           "search_flops": a["flops"]["search_checkpointed"]}
    out = CliRunner().invoke(app, ["plan", "open_clip_g", "--val-images", "50000",
                                   "--ranks", "8"], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    # 49,152 validation images (whole batches of 1024) over 8 ranks, 7 blocks of states
    assert "checkpointed / 28.99 GiB" in out.output


def test_global_allocation_cost_counts() -> None:
    """Image-block forwards, counted by hand for 3 blocks of 256 neurons, 96 validation
    images, curves on 64: coarse points 64/128/192 (grid 8, 4 points), then halving the
    spacing of 8 units down to 1 (3 rounds, 2 points each)."""
    assert refinement_points(256, 8, 4, 8) == 6 and refinement_points(256, 8, 4, 1) == 2
    c = global_cost([256] * 3, 96, 64, 8, 4, 8, verifications=1)
    f = c["image_block_forwards"]
    assert c["points"] == 3 * (3 + 6) and c["points_per_curve"] == 9
    assert f["cache"] == 2 * 96  # blocks 0-1 run once for the states entering 1 and 2
    assert f["references_and_bases"] == 96 + 96 + 64  # block 2: references, values (twice)
    assert f["curves"] == 9 * (3 + 2 + 1) * 64
    assert c["points_per_curve_at_most"] == 3 + 2 * 8  # 2 per round of the one solve
    assert f["curves_at_most"] == 19 * (3 + 2 + 1) * 64
    assert f["verification"] == 3 * 96
    assert greedy_block_forwards(3, 6, 96) == (2 + 1 + 6 * (3 + 2 + 1)) * 96
    # a checkpointed cache (checkpoint at block 0) recomputes blocks 0..l-1 for block l
    # once per sweep (coarse + 3 refinement rounds) on the curve images
    c = global_cost([256] * 3, 96, 64, 8, 4, 8, 1, checkpoints=[0])
    assert c["image_block_forwards"]["cache"] == 2 * 96 + 4 * (0 + 1 + 2) * 64


@pytest.mark.parametrize("name", list(PAPER))
def test_global_recipes_plan_curves_below_the_binary_search(name: str) -> None:
    """Each paper recipe's *_global variant is the recipe with the search changed only, and
    at the authors' validation size its curves cost fewer image-block forwards than the
    cached binary search."""
    base = load_recipe(name, check_paths=False)
    r = load_recipe(f"{name}_global", check_paths=False)
    assert (r.amp.search.measure, r.amp.search.allocation) == ("kl", "global")
    assert base.amp.search.allocation == "greedy" and base.amp.target is None
    assert 0.35 <= r.amp.target.mlp_params <= 0.5
    assert r.name == f"{name}_global"
    same = r.model_dump(exclude={"name", "output_dir"})
    same["amp"].pop("search"), same["amp"].pop("target")
    want = base.model_dump(exclude={"name", "output_dir"})
    want["amp"].pop("search"), want["amp"].pop("target")
    assert same == want
    a = plan(r)["search"]["allocation"]
    assert a["chosen"] == "global" and a["global"]["curve_images"] == 8192
    curves = a["global"]["image_block_forwards"]
    assert curves["curves"] <= curves["curves_at_most"] < a["greedy"]["image_block_forwards"]
    assert a["global"]["verifications"] == 1  # budget mode: one joint evaluation


def test_cli_plan_shows_both_costs() -> None:
    out = CliRunner().invoke(app, ["plan", "open_clip_g", "--val-images", "50000",
                                   "--curve-images", "8192"], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    assert "greedy search vs global allocation" in out.output
    assert "on 8,192 images" in out.output and "curves / greedy search (at most)" in out.output
