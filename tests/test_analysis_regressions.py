"""Regressions of the channel-group analysis found by folding real models (tiny graphs)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from foldonnx.analysis import find_channel_groups
from foldonnx.analysis.channel_groups import DimRef


def _windowed_heads_model(windows: int = 4, heads: int = 3, hd: int = 2, tokens: int = 5) -> onnx.ModelProto:
    """Windowed attention's batch axis in miniature: per-head values ``[W, T, H, hd]`` are
    permuted to ``[W, H, T, hd]`` and reshaped to ``[W·H, T, hd]`` (SAM ViT-B: 25 windows x 12
    heads = 300), then back; the heads group's size sits in a wider axis as an inner factor."""
    d = heads * hd
    rng = np.random.default_rng(0)
    inits = {
        "wv": rng.normal(size=(d, d)).astype(np.float32),
        "wo": rng.normal(size=(d, d)).astype(np.float32),
        "split_heads": np.array([windows, tokens, heads, hd]),
        "batch_heads": np.array([windows * heads, tokens, hd]),
        "unbatch": np.array([windows, heads, tokens, hd]),
        "merge_heads": np.array([windows, tokens, d]),
    }
    h = helper
    nodes = [
        h.make_node("MatMul", ["x", "wv"], ["v"], name="v_proj"),
        h.make_node("Reshape", ["v", "split_heads"], ["v4"], name="split"),
        h.make_node("Transpose", ["v4"], ["vt"], perm=[0, 2, 1, 3], name="to_heads"),
        h.make_node("Reshape", ["vt", "batch_heads"], ["vb"], name="batch"),
        h.make_node("Relu", ["vb"], ["a"], name="attn_stub"),
        h.make_node("Reshape", ["a", "unbatch"], ["a4"], name="unbatch"),
        h.make_node("Transpose", ["a4"], ["at"], perm=[0, 2, 1, 3], name="from_heads"),
        h.make_node("Reshape", ["at", "merge_heads"], ["o"], name="merge"),
        h.make_node("MatMul", ["o", "wo"], ["y"], name="o_proj"),
    ]
    graph = h.make_graph(
        nodes,
        "windowed",
        [h.make_tensor_value_info("x", TensorProto.FLOAT, [windows, tokens, d])],
        [h.make_tensor_value_info("y", TensorProto.FLOAT, [windows, tokens, d])],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def test_group_size_as_inner_factor_of_a_wider_axis_is_a_dimref_with_multiple():
    """SAM ViT-B regression: the ``windows x heads`` Reshape target must be a DimRef of the
    group with ``multiple = windows`` (it was missed, and the folded model failed in ORT)."""
    windows, heads = 4, 3
    groups = find_channel_groups(_windowed_heads_model(windows, heads))
    (g,) = [g for g in groups if any(m.tensor == "wv" for m in g.members)]
    assert g.foldable, g.blocked
    dims = {(d.tensor, d.index): d for d in g.dims}
    assert dims[("batch_heads", 0)] == DimRef("batch_heads", 0, "channels", "batch", multiple=windows)
    assert dims[("unbatch", 1)].multiple == 1 and dims[("unbatch", 1)].what == "channels"


def test_windowed_heads_fold_runs_in_ort_with_the_batch_axis_rewritten():
    import onnxruntime as ort

    from foldonnx.passes.fold import fold

    windows, heads = 4, 3
    model = _windowed_heads_model(windows, heads)
    groups = find_channel_groups(model)
    (g,) = [g for g in groups if any(m.tensor == "wv" for m in g.members)]
    folded, report = fold(model, 0.34, channel_groups=[g], groups=g.kind.value)  # verify: ORT runs it
    (r,) = report.groups
    assert (r.channels_before, r.channels_after) == (heads, 2)
    target = next(numpy_helper.to_array(t) for t in folded.graph.initializer if t.name == "batch_heads")
    assert target.tolist() == [windows * 2, 5, r.unit]
    x = np.ones((windows, 5, 6), np.float32)
    y = ort.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )[0]
    assert y.shape == (windows, 5, 6)
