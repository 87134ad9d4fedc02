"""The embedded demo end to end (reduced: 2 training epochs, fewer images)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

# Runs the demo in one process with every model build counted (the builder registry is
# looked up at each build, so wrapping the registered timm builder sees them all).
COUNTING_RUN = textwrap.dedent("""
    import json, sys
    import amp_plugin as amp
    from amp_plugin.core import models
    from amp_plugin.families.timm_vit import build_timm

    builds = []
    @amp.register_builder("timm", replace=True)
    def counting(spec):
        builds.append(spec.name)
        return build_timm(spec)

    out, sets = sys.argv[1], json.loads(sys.argv[2])
    recipe = amp.load_recipe("demo_digits", sets)
    amp.run(recipe, out, show_progress=False)
    amp.register_builder("timm", replace=True)(build_timm)
    print("BUILDS", len(builds))
""")


def _amp(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "amp_cli.app", *args], capture_output=True,
                          text=True, cwd=cwd)


def test_demo_recipe_end_to_end(tmp_path):
    run = tmp_path / "run"
    overrides = {"data.calib_images": 256, "data.val_images": 256,
                 "eval.tasks": ["knn", "linear_probe"], "distill.max_steps": 4}
    out = subprocess.run([sys.executable, "-c", COUNTING_RUN, str(run), json.dumps(overrides)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    # one process builds the original once (the committed teacher, loaded: no training), the
    # student that DeepSpeed trains and the model the ZeRO shards are consolidated into; the
    # pruned and distilled models are evaluated from memory
    assert "BUILDS 3" in out.stdout, out.stdout[-2000:]
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
    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    again = _amp("run", "demo_digits", "--out", str(run), "--no-progress", *sets,
                 "--stage", "train", "--stage", "score", "--stage", "prune")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "teacher: cached" in again.stdout and "kept from an earlier run" in again.stdout
