"""Export registry models (timm, open_clip, segment-anything, the real offline assets) to
verified ONNX files: checker-valid, loadable by ONNX Runtime, and within a tolerance of torch."""

from __future__ import annotations

from foldonnx.exporter.export import (
    DEFAULT_OPSET,
    DEFAULT_TOLERANCE,
    ExportReport,
    export_model,
    extract_dinov2_backbone,
    to_torch_export,
)
from foldonnx.exporter.parity import ParityResult, compare_outputs

__all__ = [
    "DEFAULT_OPSET",
    "DEFAULT_TOLERANCE",
    "ExportReport",
    "ParityResult",
    "compare_outputs",
    "export_model",
    "extract_dinov2_backbone",
    "to_torch_export",
]
