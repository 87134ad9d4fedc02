"""The export-format protocol and its registry.

A format writes an `Encoder` to one file with a dynamic batch dimension and loads that
file back the way a user without amp would (its own runtime only), so that the export can
be checked before it is kept. A new format is one module in this package with a
`@register_format` class, plus one import line in `amp_plugin/export/__init__.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..utils.registry import Registry

INPUT, OUTPUT = "pixel_values", "embedding"


class ExportFormat:
    name = "base"
    suffix = ""  # of the file written, e.g. ".onnx"

    def export(self, encoder: nn.Module, example: torch.Tensor, path: Path,
               metadata: dict[str, str]) -> dict:
        """Write `encoder` (traced on `example`, batch dimension dynamic) to `path`, which
        is alone in a fresh folder (a format may add files beside it), with `metadata`
        stored in the file where the format has a place for it; returns what the export
        used (exporter, opset), recorded beside the file."""
        raise NotImplementedError

    def load(self, path: Path) -> Callable[[np.ndarray], np.ndarray]:
        """A function images -> embeddings that runs the file at `path` without amp."""
        raise NotImplementedError

    def files(self, path: Path) -> list[Path]:
        """Every file the export at `path` consists of, the main file last."""
        return [path]


_FORMATS: Registry[ExportFormat] = Registry("export format")


def register_format(cls: type[ExportFormat]) -> type[ExportFormat]:
    return _FORMATS.register_class(cls)


def list_formats() -> list[str]:
    return _FORMATS.names()


def get_format(name: str) -> ExportFormat:
    return _FORMATS.get(name)
