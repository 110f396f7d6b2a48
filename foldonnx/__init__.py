"""fold-onnx: data-free compression of exported vision models on ONNX graphs."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "fold"]


def __getattr__(name: str):  # lazy: `import foldonnx` stays cheap for the CLI
    if name == "fold":
        from foldonnx.passes.fold import fold

        return fold
    raise AttributeError(f"module 'foldonnx' has no attribute {name!r}")
