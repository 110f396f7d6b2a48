"""Optional dependencies, imported by what needs them.

The core install (``pip install fold-onnx[cpu]``) runs inspect, fold, compress, quantize, bench
and eval on ``.npz`` data with no torch. What needs more names its extra in one line instead of
a ``ModuleNotFoundError``:

=================== ============== ===============================================
module              extra          needed by
=================== ============== ===============================================
onnxruntime         cpu (or gpu)   everything that runs a model
PIL (pillow)        cpu            images: preprocessing, calibration sets
sympy               cpu            ORT's quant_pre_process (skipped with a note)
matplotlib          plots          sweep's Pareto plot, ``--plot`` of passes
skimage             data           the ``photos`` source
foolbox             data           ``imagenet20``, ``cifar10``, ``cifar100``
torch, timm, ...    export         ``fold-onnx export``
=================== ============== ===============================================
"""

from __future__ import annotations

import importlib
from types import ModuleType

from foldonnx.errors import MissingDependencyError

__all__ = ["require", "EXTRAS"]

#: module -> (pip package, extra of fold-onnx that installs it)
EXTRAS: dict[str, tuple[str, str]] = {
    "onnxruntime": ("onnxruntime", "cpu"),
    "PIL": ("pillow", "cpu"),
    "sympy": ("sympy", "cpu"),
    "matplotlib": ("matplotlib", "plots"),
    "skimage": ("scikit-image", "data"),
    "foolbox": ("foolbox", "data"),
    "torch": ("torch", "export"),
    "timm": ("timm", "export"),
    "open_clip": ("open_clip_torch", "export"),
    "segment_anything": ("segment-anything", "export"),
    "yaml": ("pyyaml", "cpu"),
}


def require(module: str, what: str) -> ModuleType:
    """``import module``, or a one-line :class:`MissingDependencyError` saying that *what*
    needs it and which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        pip, extra = EXTRAS.get(top, (top, ""))
        hint = f"pip install 'fold-onnx[{extra}]'" if extra else f"pip install {pip}"
        raise MissingDependencyError(f"{what} needs the Python package {pip} ({hint})") from None
