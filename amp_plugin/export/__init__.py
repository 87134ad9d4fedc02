"""Export of a (pruned) vision tower to files that run without amp.

Registered formats (one module each, `@register_format`): onnx (onnx.py), torch-export
(torch_export.py). `export_model` traces the tower, checks the file with its own runtime
on real images, and writes it with its preprocessing recorded beside it.
"""

from . import onnx, torch_export  # noqa: F401  (registration)
from .base import INPUT, OUTPUT, ExportFormat, get_format, list_formats, register_format
from .encoder import Encoder
from .exporter import ExportMismatch, export_model, preprocessing, sidecar_path

__all__ = ["INPUT", "OUTPUT", "Encoder", "ExportFormat", "ExportMismatch", "export_model",
           "get_format", "list_formats", "preprocessing", "register_format", "sidecar_path"]
