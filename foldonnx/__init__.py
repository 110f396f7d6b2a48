"""fold-onnx: compress exported vision models on their ONNX graphs, without retraining.

Public API (imported lazily, so ``import foldonnx`` stays cheap for the CLI):

* :func:`compress` — run a recipe of passes (fold, prune, quantize, …) on a model in memory;
* :func:`fold` — fold or prune channel groups (the ``fold-onnx fold`` command);
* :func:`list_passes` / :func:`make_pass` — the registered passes;
* :class:`Pipeline`, :class:`PassContext` — compose passes yourself.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "compress", "fold", "list_passes", "make_pass", "Pipeline", "PassContext"]

_LAZY = {
    "compress": ("foldonnx.passes.compress", "compress"),
    "fold": ("foldonnx.passes.fold", "fold"),
    "list_passes": ("foldonnx.passes.registry", "list_passes"),
    "make_pass": ("foldonnx.passes.registry", "make_pass"),
    "Pipeline": ("foldonnx.passes.base", "Pipeline"),
    "PassContext": ("foldonnx.passes.base", "PassContext"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'foldonnx' has no attribute {name!r}")
