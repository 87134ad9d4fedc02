"""The embedded demo end to end (reduced: 2 training epochs, fewer images)."""

from __future__ import annotations

import json
import subprocess
import sys


def _amp(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "amp_cli.app", *args], capture_output=True,
                          text=True, cwd=cwd)


def test_demo_recipe_end_to_end(tmp_path):
    run = tmp_path / "run"
    sets = ["--set", "train.epochs=2", "--set", f"train.checkpoint={tmp_path / 'teacher'}",
            "--set", "data.calib_images=256", "--set", "data.val_images=256",
            "--set", "eval.tasks=[knn, linear_probe]", "--set", "distill.max_steps=4"]
    out = _amp("run", "demo_digits", "--out", str(run), "--no-progress", *sets)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((run / "report.json").read_text())
    for key in ("hidden_sizes", "params", "mlp_params", "flops", "accuracy", "threshold",
                "inv_temperature", "trace"):
        assert key in report, key
    assert report["threshold"] == 0.002 and report["inv_temperature"] == 20
    assert set(report["hidden_sizes"]) == {f"blocks.{i}.mlp" for i in range(4)}
    assert all(0 < h <= 256 for h in report["hidden_sizes"].values())
    assert report["mlp_params"]["after"] <= report["mlp_params"]["before"]
    assert report["flops"]["after"] <= report["flops"]["before"]
    for model in ("teacher", "pruned", "distilled"):
        assert 0 <= report["accuracy"][model] <= 100, model
    assert (run / "distilled" / "amp.json").is_file()
    assert (run / "pruned" / "model.safetensors").is_file()
    assert (run / "plots" / "hidden_sizes.png").read_bytes()[:4] == b"\x89PNG"
    # A rerun keeps the completed stages.
    again = _amp("run", "demo_digits", "--out", str(run), "--no-progress", *sets,
                 "--stage", "train", "--stage", "score", "--stage", "prune")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "teacher: cached" in again.stdout and "kept from an earlier run" in again.stdout
