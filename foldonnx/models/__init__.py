"""Models fold-onnx knows: the export registry, the real pretrained assets that install
offline, and the real images/labels used to evaluate them."""

from __future__ import annotations

from foldonnx.models.registry import ModelSpec, get_model_spec, list_models

__all__ = ["ModelSpec", "get_model_spec", "list_models"]
