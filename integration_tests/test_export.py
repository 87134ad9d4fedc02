"""`amp export`: the demo's pruned model to ONNX and torch.export, run in a Python without
amp, outputs equal to the PyTorch model's; the check that comes before any file is written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import small_open_clip
from typer.testing import CliRunner

import amp_plugin as amp
from amp_plugin.data import digits_raw, to_model_input
from amp_plugin.export import Encoder, ExportMismatch, export_model, sidecar_path
from amp_plugin.run.export import export_run

REPO = Path(__file__).resolve().parents[1]

# Runs in `python -I -S` with a sys.path of plain folders (no .pth hooks: no editable amp):
# normalises raw images with the preprocessing each export records, runs both files.
WITHOUT_AMP = textwrap.dedent("""
    import importlib.util, json, sys
    sys.path[:] = json.loads(sys.argv[1])
    assert importlib.util.find_spec("amp_plugin") is None, "amp is importable"
    import numpy as np, onnxruntime as ort, torch
    folder = sys.argv[2]
    raw = np.load(folder + "/raw.npy")  # (N, 3, S, S) RGB in [0, 1]

    def normalise(prep):
        m = np.array(prep["mean"], np.float32).reshape(1, 3, 1, 1)
        s = np.array(prep["std"], np.float32).reshape(1, 3, 1, 1)
        assert raw.shape[-1] == prep["image_size"]
        return ((raw - m) / s).astype(np.float32)

    session = ort.InferenceSession(folder + "/pruned.onnx", providers=["CPUExecutionProvider"])
    props = session.get_modelmeta().custom_metadata_map
    x = normalise({k: json.loads(props[k]) for k in ("mean", "std", "image_size")})
    name = session.get_inputs()[0].name
    np.save(folder + "/onnx.npy", session.run(None, {name: x})[0])
    np.save(folder + "/onnx1.npy", session.run(None, {name: x[:1]})[0])

    module = torch.export.load(folder + "/pruned.pt2").module()
    prep = json.load(open(folder + "/pruned.pt2.json"))["preprocessing"]
    x = torch.from_numpy(normalise(prep))
    with torch.no_grad():
        np.save(folder + "/pt2.npy", module(x).numpy())
        np.save(folder + "/pt21.npy", module(x[:1]).numpy())
    print("ran without amp")
""")


def _python_path_without_amp() -> list[str]:
    """The folders of this interpreter's sys.path, minus the repository and import hooks."""
    return [p for p in sys.path if p and Path(p).is_dir()
            and Path(p).resolve() != REPO and not (Path(p) / "amp_plugin").exists()]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """The demo scored and pruned on the committed teacher (fewer images: seconds)."""
    run = tmp_path_factory.mktemp("demo") / "run"
    recipe = amp.load_recipe("demo_digits", {"data.calib_images": 128, "data.val_images": 128,
                                             "stages": ["score", "prune"]})
    amp.run(recipe, run, show_progress=False)
    return run


@pytest.fixture(scope="module")
def onnx_export(demo_run) -> Path:
    """`amp export RUN_DIR --format onnx`: RUN_DIR/export/pruned.onnx."""
    from amp_cli.app import app

    res = CliRunner().invoke(app, ["export", str(demo_run), "--format", "onnx"])
    assert res.exit_code == 0, res.output
    assert "max |diff|" in res.output
    return demo_run / "export" / "pruned.onnx"


def test_demo_pruned_model_runs_without_amp_in_onnx_and_torch_export(demo_run, onnx_export,
                                                                     tmp_path):
    onnx_path = onnx_export
    pt2 = export_run(demo_run, "torch-export", out=tmp_path / "pruned.pt2")
    assert pt2["path"] == str(tmp_path / "pruned.pt2")
    record = json.loads(sidecar_path(onnx_path).read_text())
    assert record["preprocessing"]["image_size"] == 32
    assert record["preprocessing"]["mean"] == [0.5] * 3 == record["preprocessing"]["std"]
    assert record["input"]["shape"] == ["batch", 3, 32, 32]
    assert record["check"]["batch_sizes"] == [1, 8] and record["check"]["max_abs_diff"] < 1e-4
    assert record["exporter"] == "torch.onnx dynamo"  # the TorchScript exporter not needed
    assert record["source"] == {"run": "demo_digits", "model": "pruned",
                                "architecture": "timm:vit_small_patch16_224"}
    shutil.copy(onnx_path, tmp_path / "pruned.onnx")

    # images the search never saw (the last digits), raw, as a deployment would get them
    raw, _ = digits_raw()
    raw = to_model_input(raw[-5:], 32, (0.0,) * 3, (1.0,) * 3)  # resized, in [0, 1]
    np.save(tmp_path / "raw.npy", raw.numpy())
    out = subprocess.run([sys.executable, "-I", "-S", "-c", WITHOUT_AMP,
                          json.dumps(_python_path_without_amp()), str(tmp_path)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ran without amp" in out.stdout

    model = amp.load_pruned(demo_run / "pruned")
    hidden = sorted(v.hidden for v in amp.find_mlps(model).values())
    assert hidden[0] < 256  # really pruned
    with torch.no_grad():
        want = Encoder(model).eval()(to_model_input(raw, 32, (0.5,) * 3, (0.5,) * 3)).numpy()
    for name in ("onnx", "pt2"):
        np.testing.assert_allclose(np.load(tmp_path / f"{name}.npy"), want, rtol=0, atol=1e-4)
        np.testing.assert_allclose(np.load(tmp_path / f"{name}1.npy"), want[:1], rtol=0,
                                   atol=1e-4)
    assert want.shape == (5, 64) and np.abs(want).max() > 0.1  # real, non-trivial outputs


def test_a_failed_check_writes_nothing_and_bad_input_is_named(demo_run, onnx_export,
                                                              tmp_path):
    model = amp.load_pruned(demo_run / "pruned")
    path = tmp_path / "pruned.onnx"
    for f in (onnx_export, sidecar_path(onnx_export)):
        shutil.copy(f, tmp_path / f.name)
    before = path.read_bytes(), sidecar_path(path).read_bytes()
    diff = json.loads(before[1])["check"]["max_abs_diff"]
    assert 0 < diff < 1e-4  # onnxruntime's kernels round differently from torch's
    # a tolerance below the real difference: refused, the earlier export left as it was
    with pytest.raises(ExportMismatch, match="nothing written"):
        export_model(model, path, "onnx", image_size=32, atol=diff / 2, rtol=0)
    assert (path.read_bytes(), sidecar_path(path).read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned.onnx", "pruned.onnx.json"]

    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        export_model(model, path, "tflite")
    with pytest.raises(ValueError, match=r"images: expected \(N >= 1, 3, 32, 32\)"):
        export_model(model, path, "onnx", torch.zeros(2, 3, 16, 16), image_size=32)
    with pytest.raises(ValueError, match="std: every value must be > 0"):
        export_model(model, path, "onnx", image_size=32, std=(0.5, 0.0, 0.5))
    with pytest.raises(ValueError, match="is a folder"):
        export_model(model, tmp_path, "onnx", image_size=32)
    with pytest.raises(FileNotFoundError, match="no distilled model .run the distill stage"):
        export_run(demo_run, "onnx", model="distilled")
    with pytest.raises(ValueError, match="model: expected one of pruned, distilled, original"):
        export_run(demo_run, "onnx", model="student")
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        export_run(tmp_path, "onnx")


def test_clip_tower_exports_its_image_embedding(tmp_path):
    model = small_open_clip()
    x = to_model_input(digits_raw()[0][:3], 224, (0.48,) * 3, (0.27,) * 3)
    record = export_model(model, tmp_path / "clip.pt2", "torch-export", x, mean=(0.48,) * 3,
                          std=(0.27,) * 3)
    module = torch.export.load(tmp_path / "clip.pt2").module()
    with torch.no_grad():
        got, want = module(x), model.encode_image(x)
    assert record["output"]["shape"] == ["batch", want.shape[-1]]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
