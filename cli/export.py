"""amp export: a thin wrapper over amp_plugin.run.export."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import user_errors


@user_errors
def export_cmd(
    run_dir: Path = typer.Argument(..., help="run directory"),
    format: str = typer.Option("onnx", "--format", "-f", help="onnx or torch-export"),
    model: str = typer.Option("pruned", help="pruned, distilled or original"),
    out: Path = typer.Option(None, "--out", "-o", help="file to write (default: "
                             "RUN_DIR/export/<model>.onnx or .pt2)"),
    images: int = typer.Option(8, help="validation images the export is checked on"),
    project: bool = typer.Option(True, help="CLIP towers: embeddings in the joint "
                                 "image-text space (else the pooled features)"),
    atol: float = typer.Option(1e-4, help="absolute tolerance of the check"),
    rtol: float = typer.Option(1e-4, help="relative tolerance of the check"),
) -> None:
    """Export a run's vision tower (float32, dynamic batch) to ONNX or torch.export,
    checked against the PyTorch model on the run's images before it is written; the
    preprocessing (image size, mean, std) is recorded in <file>.json beside it."""
    from rich.console import Console

    from amp_plugin.export import sidecar_path
    from amp_plugin.run.export import export_run

    r = export_run(run_dir, format, model, out, images, project, atol, rtol)
    path = Path(r["path"])
    c = r["check"]
    Console().print(
        f"{path} ({r['exporter']}): input {r['input']['name']} {r['input']['shape']}, "
        f"output {r['output']['name']} {r['output']['shape']}; checked on {c['images']} "
        f"images (batches {c['batch_sizes']}), max |diff| {c['max_abs_diff']:.2g}\n"
        f"preprocessing: {sidecar_path(path)}")
