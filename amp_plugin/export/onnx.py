"""ONNX: torch.onnx's dynamo exporter (torch.export, then ONNX), the TorchScript
exporter where the dynamo one fails; checked with onnxruntime on the CPU."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from .base import INPUT, OUTPUT, ExportFormat, register_format

OPSET = 18


def _dynamo(encoder, example, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(encoder, (example,), dynamo=True, opset_version=OPSET,
                                input_names=[INPUT], output_names=[OUTPUT],
                                dynamic_shapes={"pixel_values": {0: batch}}, verbose=False)
    program.save(str(path))  # over 2 GB, the weights go to path + ".data"


def _torchscript(encoder, example, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its deprecation and tracer warnings
        torch.onnx.export(encoder, (example,), str(path), dynamo=False, opset_version=OPSET,
                          input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})


@register_format
class Onnx(ExportFormat):
    name = "onnx"
    suffix = ".onnx"

    def export(self, encoder, example, path, metadata):
        import onnx

        try:
            _dynamo(encoder, example, path)
            exporter = "torch.onnx dynamo"
        except Exception as e:  # any failure of the newer exporter: try the older one
            for p in path.parent.iterdir():
                p.unlink()
            _torchscript(encoder, example, path)
            exporter = f"torch.onnx TorchScript (dynamo failed: {str(e).splitlines()[0]})"
        proto = onnx.load(str(path), load_external_data=False)  # weights stay where they are
        for key, value in metadata.items():
            entry = next((p for p in proto.metadata_props if p.key == key), None)
            if entry is None:
                entry = proto.metadata_props.add()
                entry.key = key
            entry.value = value
        onnx.save(proto, str(path))
        return {"exporter": exporter, "opset": OPSET, "torch": torch.__version__}

    def load(self, path):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def run(x: np.ndarray) -> np.ndarray:
            return session.run([OUTPUT], {INPUT: x})[0]

        return run

    def files(self, path):
        data = [p for p in sorted(path.parent.iterdir()) if p != path]
        return [*data, path]
