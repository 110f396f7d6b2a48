"""``fold-onnx eval`` on the real pretrained models and real images (slow tier, ~1-2 min)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import foldonnx.cli

pytestmark = [pytest.mark.slow, pytest.mark.realmodel]


def main(argv: list[str]) -> int:
    saved = list(foldonnx.cli.COMMANDS)
    foldonnx.cli.COMMANDS[:] = ["eval"]
    try:
        return foldonnx.cli.main(argv)
    finally:
        foldonnx.cli.COMMANDS[:] = saved


def _permute_classifier(src: Path, dst: Path) -> None:
    """Cyclically permute the rows (classes) of the final Gemm's weight and bias."""
    m = onnx.load(str(src))
    gemm = [n for n in m.graph.node if n.op_type == "Gemm"][-1]
    inits = {i.name: i for i in m.graph.initializer}
    for name in gemm.input[1:3]:
        a = numpy_helper.to_array(inits[name])
        inits[name].CopyFrom(numpy_helper.from_array(np.roll(a, 1, axis=0), name))
    onnx.save(m, str(dst))


def test_efficientnet_lite0_identity_and_permuted_classes(
    efficientnet_lite0_onnx: Path, tmp_path: Path
) -> None:
    perm = tmp_path / "perm.onnx"
    _permute_classifier(efficientnet_lite0_onnx, perm)
    js = tmp_path / "e.json"
    ref = str(efficientnet_lite0_onnx)
    rc = main(["eval", ref, ref, str(perm), "--data", "imagenet20", "--json", str(js), "--no-progress"])
    assert rc == 0
    rep = json.loads(js.read_text())
    assert rep["task"] == "classifier" and rep["output_shape"] == [20, 1000]  # metadata + shape
    # real weights on real labelled images: far above chance (1/1000); [-1, 1] inputs from metadata
    assert rep["reference_accuracy"] >= 0.6
    same, permuted = rep["candidates"]
    assert same["metrics"]["top1_agreement"] == 1.0 and same["metrics"]["kl_div"] < 1e-9
    assert same["accuracy"] == rep["reference_accuracy"]
    assert permuted["metrics"]["top1_agreement"] == 0.0 and permuted["accuracy"] <= 0.05


def test_dinov2_backbone_tokens_and_probe(dinov2_backbone_onnx: Path, tmp_path: Path) -> None:
    js = tmp_path / "d.json"
    ref = str(dinov2_backbone_onnx)
    rc = main(
        ["eval", ref, ref, "--data", "imagenet20", "--limit", "2", "--probe-data", "fashion-mnist",
         "--probe-train", "60", "--probe-test", "40", "--batch-size", "4", "--json", str(js), "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    rep = json.loads(js.read_text())
    assert rep["task"] == "embedding" and rep["output_shape"] == [2, 257, 384]
    c = rep["candidates"][0]
    assert c["metrics"]["cls_cosine"] == pytest.approx(1.0) and c["metrics"]["patch_cosine"] == pytest.approx(
        1.0
    )
    assert (rep["probe_train"], rep["probe_test"]) == (60, 40)
    # 6 images per class are enough for frozen DINOv2 features to beat chance (0.1) by far
    assert rep["reference_probe"] >= 0.4
    assert c["probe"]["transfer"] == rep["reference_probe"] and c["probe"]["refit"] == rep["reference_probe"]
