"""fold-onnx: data-free compression of exported vision models on ONNX graphs."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
