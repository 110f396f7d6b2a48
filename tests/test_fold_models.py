"""Folding real architectures end to end (slow tier): export, analyse, fold, run in ORT.

Regressions of bugs that only real exports showed:

* SAM's windowed attention flattens ``windows x heads`` into one batch axis (SAM ViT-B at
  1024 px: 25 x 12 = 300); the Reshape target is a DimRef with ``multiple = windows`` that the
  fold must rewrite to ``windows x k``. A SAM image encoder of the real structure (windowed
  blocks with relative positions, global blocks, neck), shrunk to two blocks, keeps the test
  fast.
* MobileNetV3-Large's first block has a 16→16 pointwise conv inside a residual-coupled
  (depthwise) group: one tensor is the group's producer on axis 0 and consumer on axis 1.
"""

from __future__ import annotations

import importlib.util
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from foldonnx.analysis import find_channel_groups
from foldonnx.analysis.channel_groups import GroupKind
from foldonnx.passes.fold import fold

pytestmark = pytest.mark.slow


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _tiny_sam(path: Path, duplicate_heads: bool) -> onnx.ModelProto:
    """segment-anything's ImageEncoderViT, 2 blocks (windowed, global), 96 px, window 4: the
    6x6 token grid is padded to 8x8 = 4 windows. ``duplicate_heads``: heads 2, 3 of every block
    copy heads 0, 1 (q, k, v rows and the output projection's columns), so halving the heads
    is exact."""
    import torch
    from segment_anything.modeling import ImageEncoderViT

    torch.manual_seed(0)
    enc = ImageEncoderViT(
        depth=2,
        embed_dim=64,
        img_size=96,
        mlp_ratio=2,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=4,
        patch_size=16,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=(1,),
        window_size=4,
        out_chans=32,
    ).eval()
    if duplicate_heads:
        hd = 16
        with torch.no_grad():
            for blk in enc.blocks:
                w, b, p = blk.attn.qkv.weight, blk.attn.qkv.bias, blk.attn.proj.weight
                for s in range(3):
                    for src, dst in ((0, 2), (1, 3)):
                        rows = slice(s * 64 + dst * hd, s * 64 + (dst + 1) * hd)
                        w[rows] = w[s * 64 + src * hd : s * 64 + (src + 1) * hd]
                        b[rows] = b[s * 64 + src * hd : s * 64 + (src + 1) * hd]
                for src, dst in ((0, 2), (1, 3)):
                    p[:, dst * hd : (dst + 1) * hd] = p[:, src * hd : (src + 1) * hd]
    prog = torch.onnx.export(enc, (torch.randn(1, 3, 96, 96),), dynamo=True, opset_version=18, verbose=False)
    prog.save(str(path))
    return onnx.load(path)


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory):
    if importlib.util.find_spec("segment_anything") is None:
        pytest.skip("segment-anything not installed")
    return _tiny_sam(tmp_path_factory.mktemp("sam") / "tiny_sam.onnx", duplicate_heads=True)


def test_sam_windowed_and_global_attention_heads_fold(tiny_sam):
    groups = find_channel_groups(tiny_sam)
    heads = [g for g in groups if g.kind == GroupKind.HEADS]
    assert len(heads) == 2 and all(g.foldable and g.channels == 4 for g in heads)
    windowed, global_ = heads
    assert {d.multiple for d in windowed.dims} == {1, 4}  # 4 windows x heads
    assert {d.multiple for d in global_.dims} == {1}
    folded, report = fold(tiny_sam, 0.5, channel_groups=groups, groups="heads")  # verify: ORT runs it
    assert [(r.channels_before, r.channels_after) for r in report.groups] == [(4, 2), (4, 2)]
    assert not report.skipped
    x = np.random.default_rng(0).normal(size=(1, 3, 96, 96)).astype(np.float32)
    ref, out = _run(tiny_sam, x), _run(folded, x)
    assert out.shape == ref.shape == (1, 32, 6, 6)
    # duplicated heads: the fold is exact up to float32 round-off
    np.testing.assert_allclose(out, ref, atol=2e-4 * float(np.abs(ref).max()))


def test_sam_default_kinds_fold_and_run(tiny_sam):
    folded, report = fold(tiny_sam, 0.3)
    assert {r.kind for r in report.groups} >= {"heads", "mlp"} and not report.skipped
    x = np.zeros((1, 3, 96, 96), np.float32)
    assert _run(folded, x).shape == (1, 32, 6, 6)


@pytest.fixture(scope="module")
def mobilenetv3(tmp_path_factory) -> onnx.ModelProto:
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm not installed")
    from foldonnx.exporter.export import export_model

    path = tmp_path_factory.mktemp("mnv3") / "mobilenetv3_large_100.onnx"
    export_model("timm:mobilenetv3_large_100", path, image_size=96)
    return onnx.load(path)


@pytest.mark.parametrize("method", ["fold", "prune-l1"])
def test_mobilenetv3_depthwise_groups_with_a_square_conv_fold(mobilenetv3, method):
    groups = find_channel_groups(mobilenetv3)
    two_axes = [
        g
        for g in groups
        if g.foldable
        and any(len({m.axis for m in g.members if m.tensor == t}) > 1 for t in {m.tensor for m in g.members})
    ]
    assert two_axes, "expected block 0's 16->16 conv on both axes of one group"
    # round_to=1: block 0's 16-wide group would stay 16 at multiples of 8
    folded, report = fold(
        mobilenetv3, 0.25, channel_groups=groups, groups="depthwise", method=method, round_to=1
    )
    assert report.groups and not report.skipped
    ids = {r.id for r in report.groups}
    assert {g.id for g in two_axes if g.kind == GroupKind.DEPTHWISE} <= ids
    assert report.after.params < report.before.params
    x = np.random.default_rng(0).normal(size=(1, 3, 96, 96)).astype(np.float32)
    assert _run(folded, x).shape == _run(mobilenetv3, x).shape
