"""Reports: report.json, the rich table, the PNG plots and `amp report` re-rendering, on
the result of a real AMP search (small timm ViT, real digits images)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

import amp_plugin as amp
from amp_plugin.data import digits_raw, to_model_input
from amp_plugin.run.recipe import load_recipe
from amp_plugin.run.report import (
    PLOTS,
    block_label,
    build_report,
    read_json,
    render_report,
    render_table,
    to_jsonable,
    trace_summary,
    update_report,
    write_report,
)


@pytest.fixture(scope="module")
def search_result() -> dict:
    torch.manual_seed(0)
    model = amp.create_model({"library": "timm", "name": "vit_small_patch16_224", "kwargs": {
        "img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 3, "num_heads": 4,
        "num_classes": 0}}).eval()
    x, _ = digits_raw()
    images = to_model_input(x[:192], 32, (0.5,) * 3, (0.5,) * 3)
    imp = amp.AMPImportance(20.0, "entropy", show_progress=False)
    imp.accumulate(model, [images[:64]])
    pruner = amp.AMPPruner(model, images[:1], imp, [images[64:128], images[128:]],
                           threshold=2e-3, max_steps=4, show_progress=False)
    return pruner.step().to_dict()


@pytest.fixture()
def report(search_result) -> dict:
    return {"name": "digits-test", "threshold": search_result["threshold"],
            "inv_temperature": 20.0, **search_result,
            "accuracy": {"teacher": 91.25, "pruned": 84.5},
            "linear_probe": {"teacher": 95.0, "pruned": 93.75},
            "throughput": {"teacher": {"images_per_s": 400.0, "device": "cpu (2 threads)"},
                           "pruned": {"images_per_s": 500.0, "device": "cpu (2 threads)"},
                           "pruned_gain": {"throughput": 1.25, "flops": 1.4}},
            "seconds": {"prune": search_result["seconds"]}}


def _valid_png(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def test_write_report_json_and_plots(tmp_path, report):
    path = write_report(tmp_path, report)
    assert path == tmp_path / "report.json"
    data = json.loads(path.read_text())
    assert data == json.loads(json.dumps(to_jsonable(report)))
    assert data["hidden_sizes"] == report["hidden_sizes"]
    assert len(data["trace"]) == len(report["trace"]) and set(data["trace"][0]) == {
        "block", "index", "size", "entropy", "accepted", "reference"}
    for name in PLOTS:
        w, h = _valid_png(tmp_path / "plots" / name)
        assert w >= 600 and h >= 400
    assert not [p for p in tmp_path.rglob(".*")]  # atomic writes leave no temp files


def test_to_jsonable_canonical_values():
    data = {"t": torch.tensor([1.5, 2.0]), "s": torch.tensor(3), "nan": float("nan"),
            "inf": float("inf"), "tuple": (1, 2), "p": Path("/x"), "nested": {1: True}}
    assert to_jsonable(data) == {"t": [1.5, 2.0], "s": 3, "nan": None, "inf": None,
                                 "tuple": [1, 2], "p": "/x", "nested": {"1": True}}
    with pytest.raises(TypeError, match="object"):
        to_jsonable({"x": object()})


def test_table_shows_the_numbers(report):
    console = Console(record=True, width=200)
    console.print(render_table(report))
    text = console.export_text()
    p = report["params"]
    assert f"{100 * (p['after'] - p['before']) / p['before']:+.1f}%" in text
    kept, orig = sum(report["hidden_sizes"].values()), sum(report["original_sizes"].values())
    assert f"{kept:,}" in text and f"{orig:,}" in text
    for label, key in (("kNN top-1", "accuracy"), ("linear probe", "linear_probe")):
        line = next(ln for ln in text.splitlines() if label in ln)
        assert f"{report[key]['teacher']:.2f}" in line and f"{report[key]['pruned']:.2f}" in line
        assert f"{report[key]['pruned'] - report[key]['teacher']:+.2f}" in line
    line = next(ln for ln in text.splitlines() if "throughput" in ln)
    assert "400.0" in line and "500.0" in line and "x1.25 (FLOPs x1.40)" in line
    assert f"threshold {report['threshold']:g}" in text


def test_amp_report_regenerates_identical_json_and_pngs(tmp_path, report):
    from amp_cli.app import app

    write_report(tmp_path, report)
    before = (tmp_path / "report.json").read_bytes()
    for name in PLOTS:
        (tmp_path / "plots" / name).unlink()
    res = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "report.json").read_bytes() == before
    for name in PLOTS:
        _valid_png(tmp_path / "plots" / name)
    assert "AMP report: digits-test" in res.output and "kNN top-1" in res.output
    # the Python API does the same
    render_report(tmp_path)
    assert (tmp_path / "report.json").read_bytes() == before
    missing = CliRunner().invoke(app, ["report", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "report.json does not exist" in missing.output


def test_update_report_keeps_what_is_there(tmp_path, report):
    write_report(tmp_path, report)
    update_report(tmp_path, {"accuracy": {"distilled": 90.0}, "linear_probe": {"pruned": 1.0}})
    data = read_json(tmp_path / "report.json")
    assert data["accuracy"] == {"teacher": 91.25, "pruned": 84.5, "distilled": 90.0}
    assert data["linear_probe"] == {"teacher": 95.0, "pruned": 1.0}
    assert data["trace"] == to_jsonable(report["trace"])
    console = Console(record=True, width=200)
    console.print(render_table(data))
    assert "distilled" in console.export_text()


def test_build_report_from_run_dir(tmp_path, search_result):
    run = tmp_path / "run"
    run.mkdir()
    recipe_file = run / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump({
        "name": "from-dir", "output_dir": str(run),
        "model": {"library": "timm", "name": "vit_small_patch16_224"},
        "amp": {"threshold": search_result["threshold"], "inv_temperature": 20}}))
    (run / "prune.json").write_text(json.dumps({"fingerprint": "x", "result": search_result}))
    (run / "eval.json").write_text(json.dumps({"accuracy": {"teacher": 50.0, "pruned": 40.0},
                                               "eval_seconds": 2.5, "models": {}}))
    report = build_report(load_recipe(recipe_file), run, seconds={"report": 0.1})
    assert report["name"] == "from-dir"
    assert report["hidden_sizes"] == search_result["hidden_sizes"]
    assert report["accuracy"] == {"teacher": 50.0, "pruned": 40.0}
    assert report["seconds"] == {"prune": search_result["seconds"], "eval": 2.5,
                                 "report": 0.1}
    assert "models" not in report


def test_block_labels_and_many_blocks(tmp_path):
    assert block_label("blocks.11.mlp", 0) == "11"
    assert block_label("transformer.resblocks.3.mlp", 0) == "3"
    assert block_label("mlp", 7) == "7"
    # a 40-block model (OpenCLIP-g depth): labels thinned, plots still written
    names = [f"blocks.{i}.mlp" for i in range(40)]
    trace = []
    for i in reversed(range(40)):
        ref = 1.0 + 0.001 * (40 - i)
        for step, size in enumerate((3072, 1536, 2304, 1920)):
            ent = ref + (0.004 if step % 2 else -0.001) + 0.0001 * math.sin(i)
            trace.append({"block": names[i], "index": i, "size": size, "entropy": ent,
                          "accepted": ent - ref <= 2e-3, "reference": ref})
    report = {"name": "g14-shape", "threshold": 2e-3, "trace": trace,
              "original_sizes": dict.fromkeys(names, 6144),
              "hidden_sizes": {n: 1920 + 64 * (i % 5) for i, n in enumerate(names)}}
    write_report(tmp_path, report)
    for name in PLOTS:
        w, _ = _valid_png(tmp_path / "plots" / name)
        assert w > 1000


def test_stage_seconds_are_those_recorded_when_each_stage_ran(tmp_path):
    """A stage kept from an earlier run shows the seconds it took then, marked reused; the
    train stage's seconds survive `amp eval` rewriting the report."""
    from amp_cli.app import app

    spec = {"library": "timm", "name": "vit_small_patch16_224", "kwargs": {
        "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
        "num_classes": 0}}
    run = tmp_path / "run"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "name": "seconds", "output_dir": str(run), "model": spec,
        "stages": ["train", "score", "prune", "report"],
        "train": {"epochs": 1, "batch_size": 64},
        "data": {"kind": "digits", "image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3,
                 "calib_images": 64, "val_images": 64, "batch_size": 32, "workers": 0},
        "amp": {"threshold": 2e-3, "max_steps": 2}, "eval": {"tasks": ["knn"]}}))
    first = amp.run(load_recipe(path), show_progress=False)["report"]
    assert set(first["seconds"]) == {"train", "score", "prune"} and first["reused"] == []
    assert all(v > 0 for v in first["seconds"].values())

    log = Console(file=None, record=True, width=300)
    again = amp.run(load_recipe(path), console=log, show_progress=False)["report"]
    assert again["seconds"]["score"] == first["seconds"]["score"]
    assert again["seconds"]["prune"] == first["seconds"]["prune"]
    assert again["reused"] == ["train", "score", "prune"]
    caption = " ".join(log.export_text().split())
    assert (f"score {first['seconds']['score']:.1f} (reused), prune "
            f"{first['seconds']['prune']:.1f} (reused)") in caption

    out = CliRunner().invoke(app, ["eval", str(run), "--no-progress"])
    assert out.exit_code == 0, out.output
    after = json.loads((run / "report.json").read_text())
    assert after["seconds"]["train"] == again["seconds"]["train"]
    assert after["seconds"]["score"] == first["seconds"]["score"]
    assert after["seconds"]["eval"] > 0 and after["reused"] == []


def test_search_trace_title_counts_the_starting_entropy(report):
    """The real search: one evaluation per distinct trial, the starting E_val, and E_prev
    measured again for the block after one kept whole (no trial accepted)."""
    trace = report["trace"]
    order = list(dict.fromkeys(t["block"] for t in trace))  # search order
    whole = [b for b in order[:-1] if not any(t["accepted"] for t in trace if t["block"] == b)]
    measured = len({(t["block"], t["size"]) for t in trace})
    assert report["evaluations"] == measured + 1 + len(whole)
    summary = trace_summary(report)
    assert summary.startswith(f"{len(trace)} trials; {report['evaluations']} entropy "
                              f"evaluations = {measured} ")
    assert "the starting E_val" in summary
    # by hand: block 1 kept whole (3 rejected trials), block 0 with one size tried twice
    t = [{"block": "blocks.1.mlp", "size": s, "accepted": False} for s in (4, 6, 7)]
    t += [{"block": "blocks.0.mlp", "size": s, "accepted": a}
          for s, a in ((4, True), (2, False), (2, False))]
    assert trace_summary({"trace": t, "evaluations": 7}) == (
        "6 trials; 7 entropy evaluations = 5 measured trials + the starting E_val + 1 E_prev "
        "re-measured after a block kept whole (1 trial reused a size measured before)")
    assert trace_summary({"trace": t[3:5], "evaluations": 3}) == (
        "2 trials; 3 entropy evaluations = 2 trials + the starting E_val")
