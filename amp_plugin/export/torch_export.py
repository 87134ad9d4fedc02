"""torch.export: an ExportedProgram (.pt2) that `torch.export.load` runs with torch alone."""

from __future__ import annotations

import numpy as np
import torch

from .base import ExportFormat, register_format


@register_format
class TorchExport(ExportFormat):
    name = "torch-export"
    suffix = ".pt2"

    def export(self, encoder, example, path, metadata):
        batch = torch.export.Dim("batch", min=1)
        program = torch.export.export(encoder, (example,),
                                      dynamic_shapes={"pixel_values": {0: batch}})
        torch.export.save(program, str(path), extra_files={
            f"amp/{k}": v for k, v in metadata.items()})
        return {"exporter": "torch.export", "torch": torch.__version__}

    def load(self, path):
        module = torch.export.load(str(path)).module()

        @torch.no_grad()
        def run(x: np.ndarray) -> np.ndarray:
            return module(torch.from_numpy(x)).numpy()

        return run
